"""Test environment: 8 fake CPU devices, no hub access, absl flags parsed. Must run before jax is imported."""
import os

# The tests' programs are tiny and compiled once each: LLVM's expensive passes cost more than they save (2-core CI:
# tests/test_uhd_v1.py 325 s -> 150 s). Numerics do not change; what is measured for speed is measured outside tests.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402

# Parity tests compare against float32 PyTorch on CPU: full-precision matmuls.
jax.config.update("jax_default_matmul_precision", "highest")
# Tests that train a stage twice (resume, comparisons) compile the same step again in a new jit: a persistent
# compilation cache for this session turns the second compile into a load (2-core CI: ~50 s each for a v2 step).
# Both xdist workers of one run share it (the serving files compile the same tiny generators), and so do the
# commands tests start as subprocesses (uhd-chat, uhd-generate...), through the environment.
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    import tempfile

    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    cache = os.path.join(tempfile.gettempdir(), f"uhd-jax-test-xla-cache-{run}") if run else \
        tempfile.mkdtemp(prefix="uhd-jax-test-xla-cache-")
    os.makedirs(cache, exist_ok=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """A small synthetic text-rich dataset (LLaVA JSON + images) and its tokenizer, shared by the data tests."""
    from uhd_jax.data.synthetic import build_tokenizer, corpus_texts, write_dataset

    root = str(tmp_path_factory.mktemp("synthetic"))
    train = write_dataset(root, "train", 48, seed=0, min_side=64, max_side=320)
    held = write_dataset(root, "eval", 16, seed=1, min_side=64, max_side=320)
    build_tokenizer(corpus_texts([train["pretrain"], train["sft"]]), root + "/tokenizer", vocab_size=600)
    return {"root": root, "train": train, "eval": held, "tokenizer": root + "/tokenizer", "images": root + "/images"}
