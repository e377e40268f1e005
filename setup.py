"""uhd-jax: LLaVA-UHD v1/v2, SliME, LLaVA-1.5 and LLaVAR in JAX/Flax.

Versions are pinned to the set the test suite runs against; change them together and re-run `make test`.
"""
from setuptools import find_packages, setup

CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "ml-collections==1.1.0",
    "transformers==5.23.0",
    "pillow==13.0.0",
    "numpy==2.4.6",
    "absl-py==2.5.1",
    "tensorboardX==2.6.5",
    "tqdm==4.70.1",
]
# Conversion to/from PyTorch checkpoints and the parity tests. torch 2.13.0 is the CPU build.
TORCH = ["torch==2.13.0", "safetensors==0.8.0"]
# pytest-xdist: `make test` runs two worker processes (2-core machine, clean clone, 2026-12-02: 499 tests in 17.3 min)
# peft (+ accelerate, which it imports): tests/test_lora.py loads and writes PEFT adapter directories with it
# openai: tests/test_server*.py drive `uhd-serve` with the official client
TEST = ["pytest==9.2.0", "pytest-xdist==3.8.0", "execnet==2.1.2", "peft==0.21.2", "accelerate==1.15.0",
        "openai==3.51.0"]
# lmms-eval (`--model uhd_jax`): what lmms-eval 0.7.3 imports to run a task, resolved against the pins above. lmms-eval
# itself goes in with `pip install --no-deps lmms-eval==0.7.3`: its own requirements (torchvision, wandb==0.25.0 with
# protobuf<7, opencv, ...) would replace torch 2.13.0 and protobuf. Released formats read here: MMMU's parquet
# (pyarrow), MMBench's xlsx (openpyxl).
# filelock 3: lmms-eval's evaluator patches filelock._api, which filelock 4 no longer has.
LMMS = ["datasets==5.2.0", "evaluate==0.4.6", "loguru==0.7.3", "sacrebleu==2.6.0", "tenacity==9.2.1", "pytz==2026.6",
        "pytablewriter==1.2.1", "filelock==3.32.7"]
# The test extra carries them (tests/test_benchmarks_extra.py reads hand-made parquet and xlsx files): 7 s to install.
FORMATS = ["pyarrow==26.0.1", "openpyxl==3.1.5", "et-xmlfile==2.0.0"]
# Accelerators: jax's own extras pull the PJRT plugin built for the pinned jaxlib (CUDA 12 wheels with cuDNN and NCCL;
# libtpu), so the plugin can never drift from the pin. tests/test_install.py checks both resolve.
ACCELERATORS = {"cuda12": ["jax[cuda12]==0.10.2"], "tpu": ["jax[tpu]==0.10.2"]}

# The commands `pip install .` puts on PATH; in a checkout `python launch/<name>.py` runs the same programs.
COMMANDS = {
    "uhd-train": "uhd_jax.cli.commands:train",
    "uhd-generate": "uhd_jax.cli.commands:generate",
    "uhd-evaluate": "uhd_jax.cli.commands:evaluate",
    "uhd-convert": "uhd_jax.cli.commands:convert",
    "uhd-check-data": "uhd_jax.cli.commands:check_data",
    "uhd-show-slices": "uhd_jax.cli.commands:show_slices",
    "uhd-benchmark": "uhd_jax.cli.commands:benchmark",
    "uhd-demo": "uhd_jax.cli.commands:demo",
    "uhd-serve": "uhd_jax.cli.commands:serve",
    "uhd-chat": "uhd_jax.cli.commands:chat",
}

setup(
    name="uhd-jax",
    version="0.1.0",
    description="JAX/Flax LLaVA-UHD v1/v2, SliME, LLaVA-1.5 and LLaVAR: training, evaluation, torch conversion",
    python_requires=">=3.11",
    packages=find_packages(include=["uhd_jax", "uhd_jax.*"]),
    # the page uhd-serve gives at /; the demo's pretrained glyph ViT
    package_data={"uhd_jax.serve": ["web/*"], "uhd_jax.configs": ["*.npz"]},
    install_requires=CORE,
    entry_points={"console_scripts": [f"{name}={target}" for name, target in COMMANDS.items()],
                  # lmms-eval 0.7 builds its model registry from this group: `lmms-eval --model uhd_jax`
                  "lmms_eval.models": ["uhd_jax = uhd_jax.integrations:lmms_manifest"]},
    extras_require={"torch": TORCH, "test": TORCH + TEST + FORMATS, "lmms": TORCH + LMMS + FORMATS,
                    "formats": FORMATS, **ACCELERATORS},
)
