"""The demo (`make demo` itself is not run here): its data shows the code only at slice resolution, its summary and
baselines count per question group, and launch/demo.py refuses what it cannot run before it renders or trains."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from tests.cli_mistakes import assert_mistake


def code_rows(img: Image.Image) -> int:
    """Rows holding the code's ink: the only near-black pixels of a card (shapes and backgrounds are coloured)."""
    a = np.asarray(img.convert("RGB"), np.int32)
    dark = (a.max(axis=-1) < 90).any(axis=1)
    return int(dark.sum())


def test_card_code_is_illegible_padded_to_112_px_and_legible_in_a_slice():
    """On a 448 x 112 card the printed digit is 10-16 px high; LLaVA-1.5's padded 112 px square shrinks them 4x
    (<= 4 rows, under a third of a 14 px patch), UHD's slice along the card keeps them at full size."""
    from uhd_jax.data.slicing import slice_image
    from uhd_jax.data.synthetic_cards import render

    for i in range(4):
        img, caption, qa = render(0, i, long_side=448)
        assert max(img.size) == 448 and min(img.size) == 112
        code = dict(qa)["What is the code?"]
        assert len(code) == 1 and code.isdigit() and caption.endswith(f"the code {code}")
        assert 10 <= code_rows(img) <= 18   # the digit runs along x on wide and tall cards alike
        w, h = img.size
        square = Image.new("RGB", (448, 448), (128, 128, 128))
        square.paste(img, ((448 - w) // 2, (448 - h) // 2))
        small = square.resize((112, 112), Image.Resampling.BICUBIC)
        ink = np.asarray(small, np.int32).max(axis=-1) < 90
        axis = 1 if w > h else 0      # rows of a wide card, columns of a tall one (its text still runs along x)
        assert int(ink.any(axis=axis).sum()) <= 4
        sliced = slice_image(img, max_slices=4, scale_resolution=112, patch_size=14)
        assert len(sliced.slices) == 4 and all(s.size == (112, 112) for s in sliced.slices)
        assert max(code_rows(s) for s in sliced.slices) >= 10


def test_card_splits_ask_the_code_and_the_coarse_questions(tmp_path):
    from uhd_jax.data.synthetic_cards import COARSE_QUESTIONS, FINE_QUESTIONS, render, write_dataset

    train = write_dataset(str(tmp_path), "train", 6, seed=0, long_side=224, turns=3)
    held = write_dataset(str(tmp_path), "eval", 4, seed=1, long_side=224)
    with open(train["sft"]) as f:
        rows = json.load(f)
    for i, row in enumerate(rows):
        answers = dict(render(0, i, 224)[2])
        turns = [(row["conversations"][k]["value"].replace("<image>\n", "").split("\n")[0],
                  row["conversations"][k + 1]["value"]) for k in range(0, 6, 2)]
        assert ("What is the code?", answers["What is the code?"]) in turns
        assert all(answers[q] == a for q, a in turns) and len({q for q, _ in turns}) == 3
        assert os.path.exists(os.path.join(train["images"], row["image"]))
    with open(held["sft"]) as f:
        rows = json.load(f)
    assert [r["group"] for r in rows] == ["fine", "coarse"] * 4
    assert all(r["conversations"][0]["value"].split("\n")[1] in (FINE_QUESTIONS if r["group"] == "fine"
                                                                  else COARSE_QUESTIONS) for r in rows)


def test_image_blind_baseline_and_summary_per_group():
    from uhd_jax.cli.demo import prior_baseline, summary

    def sample(q, a):
        return {"conversations": [{"from": "human", "value": f"<image>\n{q}\nAnswer briefly."},
                                  {"from": "gpt", "value": a}]}

    train = [sample("What is the code?", "123"), sample("What is the code?", "123"), sample("What is the code?", "9"),
             sample("What color is the card?", "gray"), sample("What color is the card?", "cyan")]
    held = [sample("What is the code?", "123"), sample("What is the code?", "456"),
            sample("What color is the card?", "gray"), sample("How many shapes are there?", "2")]
    prior = prior_baseline(train, held)
    assert prior == {"fine": 0.5, "coarse": 0.5}   # "123" for the code; gray for the card; nothing for the count
    runs = [{"model": m, "seed": s, "flops": f, "groups": {"fine": fi, "coarse": co}}
            for m, s, f, fi, co in (("A", 0, 1e12, 0.10, 0.80), ("B", 0, 1.1e12, 0.55, 0.80),
                                    ("A", 1, 1e12, 0.20, 0.70), ("B", 1, 1.1e12, 0.65, 0.75))]
    text = "\n".join(summary(runs, prior, 4))
    assert "15.0% [10.0 20.0]" in text and "60.0% [55.0 65.0]" in text and "(1.10x)" in text
    assert "B - A, fine: seed 0 +45.0, seed 1 +45.0 points" in text
    assert "B - A, coarse: seed 0 +0.0, seed 1 +5.0 points" in text


def test_wilson_interval_matches_the_textbook_values():
    from uhd_jax.eval.synthetic_bench import wilson

    assert wilson(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)   # Newcombe (1998), 95%
    assert wilson(0, 100) == pytest.approx((0.0, 0.0370), abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def test_demo_cli_user_mistakes(tmp_path, capsys):
    from uhd_jax.cli.demo import main

    work = ["--workdir", str(tmp_path / "demo")]
    assert_mistake(capsys, main, work + ["--models", "llava15,uhd_v3"], "unknown ['uhd_v3']; choose from ['llava15'")
    assert_mistake(capsys, main, work + ["--train", "0"], "give at least one image each")
    assert_mistake(capsys, main, work + ["--seeds", "0,x"], "give comma-separated integers")
    (tmp_path / "file").write_text("")
    assert_mistake(capsys, main, ["--workdir", str(tmp_path / "file")], "is a file; give a directory")
    # a cached dataset that lost files since it was rendered
    tokenizer = tmp_path / "demo" / "data" / "synthetic" / "tokenizer"
    os.makedirs(tokenizer)
    (tokenizer / "tokenizer.json").write_text("{}")
    assert_mistake(capsys, main, work, "lacks ['train_pretrain.json', 'train_sft.json', 'eval_sft.json', 'images', "
                                       "'glyph_vit/config.json']; delete")


def test_demo_stopped_by_a_signal_exits_128_plus_the_signal(tmp_path, capsys, monkeypatch):
    """trainer.run raises Preempted after SIGTERM/SIGINT has checkpointed the step: the demo says so and exits
    128 + signum like launch/train.py, instead of a traceback."""
    import signal

    from uhd_jax.cli import demo
    from uhd_jax.train.trainer import Preempted

    def preempted(*args, **kwargs):
        raise Preempted("stage pretrain: stopped by SIGTERM after step 3 (checkpoint of step 3 in x); rerun the same "
                        "command to resume", signal.SIGTERM)

    monkeypatch.setattr(demo, "train_and_score", preempted)
    assert demo.main(["--workdir", str(tmp_path / "demo"), "--train", "4", "--eval", "2"]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "demo.py: stage pretrain: stopped by SIGTERM after step 3" in err and "Traceback" not in err


def test_demo_models_train_alike_except_the_image_path():
    """#19: whatever makes LLaVA-1.5 fail must be resolution, so its demo recipe is UHD v2's but for the image path:
    the same towers, the same glyph-reading ViT frozen in both stages, the same epochs, batch, rates and groups."""
    from uhd_jax.cli_errors import load_config
    from uhd_jax.configs.llava15 import DEMO_VIT

    llava, uhd = load_config("configs/llava15.py:demo"), load_config("configs/uhd_v2.py:demo")
    assert llava.model.vision.to_dict() == uhd.model.vision.to_dict()
    assert llava.model.llm.to_dict() == uhd.model.llm.to_dict()
    assert llava.stage_order == uhd.stage_order == ("pretrain", "sft")
    for name in llava.stage_order:
        a, b = llava.stages[name], uhd.stages[name]
        for key in ("num_epochs", "batch_size", "grad_clip_norm", "vision_trainable"):
            assert a[key] == b[key], (name, key)
        assert a.lrs.to_dict() == b.lrs.to_dict()
        assert not a.vision_trainable and ("vision/.*", "frozen") in [tuple(r) for r in a.trainable]
        groups = {tuple(r)[1] for r in a.trainable} - {"frozen"}
        assert groups == {tuple(r)[1] for r in b.trainable} - {"frozen"} == set(a.lrs)
    assert llava.stages.pretrain.init_checkpoints == uhd.stages.pretrain.init_checkpoints == [DEMO_VIT]


def test_demo_uhd_v2_keeps_its_jbu_frozen_and_trains_the_rest_of_its_projector():
    """The real recipe freezes the JBU after its own stage; the demo (no `jbu` stage) keeps it as initialised, and
    trains the HiWin part of the projector in stage 1 only."""
    import jax

    from uhd_jax.cli_errors import load_config
    from uhd_jax.models.vlm import init_fn
    from uhd_jax.train import optimizer as opt
    from uhd_jax.train.trainer import model_for_stage

    config = load_config("configs/uhd_v2.py:demo")
    for name, projector_trains in (("pretrain", True), ("sft", False)):
        stage = config.stages[name]
        params = jax.eval_shape(init_fn(model_for_stage(config, stage)), jax.random.PRNGKey(0))["params"]
        labels = {opt.path_str(p): g for p, g in
                  jax.tree_util.tree_flatten_with_path(opt.group_labels(params, stage.trainable))[0]}
        upsampler = [g for p, g in labels.items() if p.startswith("projector/upsampler/")]
        assert upsampler and set(upsampler) == {opt.FROZEN}, name
        hiwin = {g for p, g in labels.items() if p.startswith("projector/query_")}
        assert hiwin == ({"projector"} if projector_trains else {opt.FROZEN}), name
