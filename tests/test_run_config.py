"""The training config on the command line: list-valued overrides, --data, a config file of one's own, the default
run directory, and the note when an override changes the global batch. Nothing here builds a model."""
import os
import subprocess
import sys

import pytest

from uhd_jax.cli_errors import UserError, load_config
from uhd_jax.train.cli import default_workdir, load_run_config, parse_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UHD_V2 = os.path.join(REPO, "uhd_jax", "configs", "uhd_v2.py")


def test_list_fields_take_literals_comma_separated_strings_or_nothing():
    c = load_config(UHD_V2, ["stages.pretrain.init_checkpoints=checkpoints/a,checkpoints/b",
                             "stages.sft.init_checkpoints=",
                             'stages.sft.sources=[{"json": "a.json", "image_folder": "imgs", "weight": 2}]',
                             "stage_order=pretrain,sft"])
    assert list(c.stages.pretrain.init_checkpoints) == ["checkpoints/a", "checkpoints/b"]
    assert list(c.stages.sft.init_checkpoints) == []
    assert c.stages.sft.sources == [{"json": "a.json", "image_folder": "imgs", "weight": 2}]
    assert c.stage_order == ("pretrain", "sft")   # a tuple stays a tuple
    with pytest.raises(UserError, match=r"sources=a.json: not a valid list \(write the whole list as a literal, "
                                        r"e.g. '\[\{\"json\": \"llava_v1_5_mix665k.json\""):
        load_config(UHD_V2, ["stages.sft.sources=a.json"])
    with pytest.raises(UserError, match="every item must be a string"):
        load_config(UHD_V2, ["stages.pretrain.init_checkpoints=[1]"])
    # numbers stay numbers, whether the field holds some (sft's buckets) or none yet (pretrain's)
    c = load_config(UHD_V2, ["stages.sft.length_buckets=512,1024", "stages.pretrain.length_buckets=640"])
    assert c.stages.sft.length_buckets == (512, 1024) and c.stages.pretrain.length_buckets == (640,)
    with pytest.raises(UserError, match=r"length_buckets=512,x: not a valid tuple \('x' is not a number\)"):
        load_config(UHD_V2, ["stages.sft.length_buckets=512,x"])


def test_data_flag_replaces_a_stages_sources_with_paths_from_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = load_run_config(UHD_V2, ["data_root=/elsewhere"], ["sft=a.json:imgs", "sft=sub/b.json:imgs2:0.25",
                                                           "jbu=coco/train2017"])
    assert c.stages.sft.sources == [
        {"json": str(tmp_path / "a.json"), "image_folder": str(tmp_path / "imgs"), "weight": 1.0},
        {"json": str(tmp_path / "sub" / "b.json"), "image_folder": str(tmp_path / "imgs2"), "weight": 0.25}]
    assert c.stages.jbu.sources == [{"image_folder": str(tmp_path / "coco" / "train2017")}]
    assert c.stages.pretrain.sources[0]["json"] == "LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"   # untouched
    for item, message in [("sft", "write STAGE=FILE.json:IMAGE_FOLDER"), ("sfft=a.json:i", "unknown stage 'sfft'"),
                          ("sft=a.json:i:x", "the weight 'x' is not a number"), ("sft=a.json", "write STAGE=")]:
        with pytest.raises(UserError, match=message):
            parse_data(item, c)


def test_a_config_of_ones_own_extends_a_shipped_one_from_any_directory(tmp_path, monkeypatch):
    own = tmp_path / "elsewhere" / "my_uhd.py"
    os.makedirs(own.parent)
    own.write_text("from uhd_jax.configs import uhd_v2\n\n\ndef get_config(arg=None):\n    c = uhd_v2.get_config(arg)\n"
                   "    c.data_root = '/mnt/data'\n"
                   "    c.stages.sft.sources = [dict(json='mine.json', image_folder='mine')]\n    return c\n")
    monkeypatch.chdir(tmp_path)
    # Outside the checkout (a notebook, another project) `configs` is not importable by itself.
    code = "from uhd_jax.config_loading import load_config; print(load_config('elsewhere/my_uhd.py:13b').variant)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "13b", done.stderr
    c = load_run_config(f"{own}:13b", [])
    assert c.family == "uhd_v2" and c.variant == "13b" and c.stages.sft.sources[0]["json"] == "mine.json"
    assert default_workdir(f"{own}:13b", c) == os.path.join("runs", "my_uhd-13b")
    assert default_workdir("configs/uhd_v2.py", load_config(UHD_V2)) == os.path.join("runs", "uhd_v2-7b")


def test_changing_batch_size_says_it_is_the_global_batch(capsys):
    load_run_config(os.path.join(REPO, "uhd_jax", "configs", "llava15.py") + ":7b",
                    ["stages.sft.batch_size=64", "stages.sft.grad_accum=2"])
    out = capsys.readouterr().out
    assert "stages.sft.batch_size 64 replaces the config's 128: batch_size is the global batch" in out
    assert "trains at 64, not 128" in out and "(--config.stages.sft.grad_accum=2: micro-batches of 64)" in out
    load_run_config(os.path.join(REPO, "uhd_jax", "configs", "llava15.py") + ":7b", ["stages.sft.grad_accum=2"])
    assert capsys.readouterr().out == ""
