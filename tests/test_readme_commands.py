"""The README's commands work as written (issue #17).

Every fenced block of README.md marked `<!-- tested: readme NAME -->` is read here line by line and each `uhd-*`
command in it runs through its installed console-script entry point (the `console_scripts` of setup.py, called
in-process with the README's arguments), in a temporary directory laid out as "Preparing the real data" says: tiny
random Vicuna and CLIP folders written by transformers under data/checkpoints/, a few LLaVA-format samples with
images in every data file the recipes read, and the Generation block's inputs (photo.jpg, a TextVQA question file,
its images and annotations) beside them.

The one rewrite a command gets is its size (readme_helpers.tiny_size): a shipped variant V becomes `V_tiny`, the
same recipe - stages, templates, trainable rules, data paths, tokenizer - at test sizes (e.g. `configs/llava15.py:7b`
-> `configs/llava15.py:7b_tiny`), and so do the names made from it (`runs/llava15-7b` -> `runs/llava15-7b_tiny`,
`checkpoints/llava15-7b-init` -> `checkpoints/llava15-7b_tiny-init`). No flag is added, dropped or changed; optional
parts written `[--flag VALUE]` are given.

What runs end to end: LLaVA-1.5's whole path (import, both stages, generation, TextVQA scoring, export to llava-hf
and to the original layout, the data check, the slice pictures), LLaVA-UHD v1's import, two stages and export, and
every import. The training commands of UHD v2, SliME and LLaVAR run their preflight (every input of every stage
checked, nothing built: `train.py` with the trainer's `run` replaced by `preflight`). Two commands cannot run here and
must fail with their documented message instead: cuDNN generation on a CPU, and the reading benchmark that needs
`make demo`'s trained models. Every command of a marked block runs (a new one too); a marked block that disappears
fails the first test.
"""
import contextlib
import io
import json
import os
from importlib.metadata import entry_points

import pytest

from tests import readme_helpers as rh

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BLOCKS = ("prepare", "uhd_v1", "uhd_v2", "uhd_v2_jbu", "slime", "llavar", "generation", "convert", "check_data")
# Commands that cannot succeed on this machine or in this budget, and the message they must fail with (exit 2).
CANNOT_RUN = {
    "--config.model.attention_impl=cudnn": "which needs an NVIDIA GPU",   # on a CPU; runs where JAX has a GPU
    "runs/demo/data": "--data-root runs/demo/data: not found",   # `make demo`'s data and models
}


def marked_blocks() -> dict:
    return rh.tested_blocks(README)


def run(argv: list[str], expect: int = 0, preflight_only: bool = False) -> str:
    """`argv` (a README command after the size rewrite) through its console script in this process: its output."""
    script = {e.name: e for e in entry_points(group="console_scripts")}[argv[0]]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), preflight_instead(preflight_only) as checked:
        try:
            rc = script.load()(argv[1:])
        except SystemExit as e:   # argparse's usage errors
            rc = e.code
    assert rc == expect, f"{' '.join(argv)} -> exit {rc}, expected {expect}:\n{out.getvalue()[-3000:]}"
    assert len(checked) == preflight_only, f"{' '.join(argv)}: train.py returned before its preflight"
    return out.getvalue()


@contextlib.contextmanager
def preflight_instead(active: bool):
    """While active, train.py's call into the trainer checks every stage's inputs and trains nothing."""
    from uhd_jax.train import trainer

    checked = []
    if not active:
        yield checked
        return
    real = trainer.run

    def check_only(config, workdir, stages=None):
        checked.append(trainer.preflight(config, workdir, stages))
        return []

    trainer.run = check_only
    try:
        yield checked
    finally:
        trainer.run = real


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The README's layout in a fresh directory, made the current one for the module's commands, with every
    `uhd-convert import` of the recipe blocks run: they are cheap, and the training commands read what they write."""
    from uhd_jax.config_loading import load_config

    root = str(tmp_path_factory.mktemp("readme"))
    sizes = load_config("configs/llava15.py:7b_tiny").model
    checkpoints = os.path.join(root, "data/checkpoints")
    os.makedirs(checkpoints)
    rh.write_towers(checkpoints, sizes.llm.to_dict(), sizes.vision.to_dict())
    rh.write_datasets(os.path.join(root, "data"))
    rh.write_textvqa(root)
    rh.write_vdim(os.path.join(root, "clip-large-vdim.ckpt"), sizes.vision.hidden_size)
    rh.write_convert_inputs(root, checkpoints, sizes.vision.hidden_size)
    before = os.getcwd()
    os.chdir(root)
    try:
        blocks = marked_blocks()
        for name in RECIPES:
            for argv in blocks[name]:
                if argv[:2] == ["uhd-convert", "import"]:
                    run(rh.tiny_size(argv))
        yield blocks
    finally:
        os.chdir(before)


RECIPES = ("prepare", "uhd_v1", "uhd_v2", "uhd_v2_jbu", "slime", "llavar")
TRAINED = ("llava15", "uhd_v1")   # the recipes trained end to end; the others' training commands are preflighted


def execute(argv: list[str]) -> str:
    """A README command, sized: run, preflighted (training of the recipes not in TRAINED) or, in CANNOT_RUN, run
    for its documented failure."""
    argv = rh.tiny_size(argv)
    for word, message in CANNOT_RUN.items():
        if word in argv:
            if word.startswith("--config.model.attention_impl=cudnn") and jax_has_gpu():
                return run(argv)
            out = run(argv, expect=2)
            assert message in out, out
            return out
    if argv[0] == "uhd-train":
        family = os.path.basename(argv[argv.index("--config") + 1]).partition(".py")[0]
        return run(argv, preflight_only=family not in TRAINED)
    return run(argv)


def jax_has_gpu() -> bool:
    import jax

    return jax.default_backend() == "gpu"


def test_every_marked_block_is_there_and_parses():
    blocks = marked_blocks()
    assert sorted(blocks) == sorted(BLOCKS), f"marked README blocks {sorted(blocks)}, expected {sorted(BLOCKS)}"
    for name, cmds in blocks.items():
        assert cmds and all(argv[0].startswith("uhd-") for argv in cmds), (name, cmds)
    assert rh.tiny_size(["uhd-train", "--config", "configs/uhd_v1.py:13b", "--out", "data/checkpoints/uhd_v1-13b-init",
                         "--src", "data/checkpoints/vicuna-13b-v1.5", "runs/uhd_v2-7b/sft/final"]) == [
        "uhd-train", "--config", "configs/uhd_v1.py:13b_tiny", "--out", "data/checkpoints/uhd_v1-13b_tiny-init",
        "--src", "data/checkpoints/vicuna-13b-v1.5", "runs/uhd_v2-7b_tiny/sft/final"]
    check = blocks["check_data"][0]
    assert check[check.index("--limit"):] == ["--limit", "20000", "--report", "sft.json"]   # [optional] parts given


@pytest.fixture(scope="module")
def llava15(work):
    """LLaVA-1.5 trained, both stages, by the first training command of 'Preparing the real data'."""
    first = next(argv for argv in work["prepare"] if argv[0] == "uhd-train")
    assert first[:3] == ["uhd-train", "--config", "configs/llava15.py:7b"], first
    execute(first)
    return "runs/llava15-7b_tiny/sft/final"


@pytest.mark.parametrize("block", RECIPES)
def test_recipe_block(work, block, request):
    """Each recipe's commands after its imports (done by `work`): training (end to end or preflighted) and export."""
    llava15 = request.getfixturevalue("llava15") if block == "prepare" else None
    for argv in work[block]:
        if argv[:2] == ["uhd-convert", "import"]:
            continue
        if block == "prepare" and argv[:3] == ["uhd-train", "--config", "configs/llava15.py:7b"]:
            out = "done by the llava15 fixture"
        else:
            out = execute(argv)
        if argv[:2] == ["uhd-convert", "export"]:
            assert os.path.isfile(os.path.join(argv[argv.index("--out") + 1], "config.json")), out
    if block == "prepare":
        for stage in ("pretrain", "sft"):
            with open(f"runs/llava15-7b_tiny/{stage}/metrics.jsonl") as f:
                assert [json.loads(line)["step"] for line in f] == [1], stage
        with open(os.path.join(llava15, "config.json")) as f:
            meta = json.load(f)
        assert (meta["family"], meta["variant"], meta["stage"]) == ("llava15", "7b_tiny", "sft")
    if block == "uhd_v1":
        assert os.path.isfile("runs/uhd_v1-13b_tiny/sft/final/config.json")


def test_generation_block(work, llava15):
    outs = [execute(argv) for argv in work["generation"]]
    with open("ans/textvqa.jsonl") as f:
        answers = [json.loads(line) for line in f]
    assert len(answers) == 4 and all(a["model_id"] == "llava15-7b_tiny-sft" for a in answers)
    assert any("accuracy" in out for out in outs)
    assert os.path.isfile("photo.slices.png")


def test_convert_block(work):
    for argv in work["convert"]:
        execute(argv)
    assert os.path.isfile("hf/config.json") and os.path.isfile("ckpt/proj/config.json")


def test_check_data_block(work):
    out = execute(work["check_data"][0])
    with open("sft.json") as f:
        report = json.load(f)
    assert "sft" in out and isinstance(report, (dict, list)), out
