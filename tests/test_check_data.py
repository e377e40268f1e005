"""tools/check_data.py: a dry run over a stage's data counts what training would skip, truncate and overflow."""
import json
import os
import pickle

from PIL import Image

from tests.cli_mistakes import assert_mistake
from uhd_jax.data.dataset import read_samples

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "uhd_jax", "configs", "llava15.py") + ":tiny"


def planted_data(d, tmp_path):
    """12 good samples of the synthetic set plus one of each planted fault, in a folder of their own."""
    img_dir = tmp_path / "imgs"
    os.makedirs(img_dir)
    (img_dir / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"garbage" * 20)
    Image.new("RGB", (600, 100), "white").save(img_dir / "wide.png")
    good = read_samples(d["train"]["sft"])[:12]
    for s in good:
        s["image"] = os.path.relpath(os.path.join(d["images"], s["image"]), img_dir)
    q = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]
    bad = [
        {"id": "missing", "image": "nope.png", "conversations": q},
        {"id": "corrupt", "image": "corrupt.jpg", "conversations": q},
        {"id": "two_placeholders", "image": "wide.png", "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhat?"}, {"from": "gpt", "value": "x"}]},
        {"id": "long_answer", "image": "wide.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "total " * 200}]},
    ]
    path = tmp_path / "planted.json"
    path.write_text(json.dumps(good + bad))
    return path, img_dir


def test_check_data_counts_skips_truncations_and_the_plan(synthetic_data, tmp_path, capsys):
    from uhd_jax.cli.check_data import main

    d = synthetic_data
    path, img_dir = planted_data(d, tmp_path)
    report = tmp_path / "out" / "report.json"
    argv = ["--config", TINY, "--stage", "sft", "--data", f"sft={path}:{img_dir}", "--workers", "0",
            "--report", str(report), f"--config.data_root={d['root']}", "--config.tokenizer=tokenizer",
            "--config.model.llm.vocab_size=640", "--config.stages.sft.max_length=112",
            "--config.stages.sft.batch_size=4", "--config.stages.sft.num_epochs=2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    r = json.loads(report.read_text())
    assert r["samples"] == 16 and r["usable"] == 13
    assert r["skipped"] == {"missing image": 1, "corrupt image": 1, "image count": 1}
    assert r["truncated"] == 1 and r["image_token_overflows"] == 0
    assert {s["id"] for s in r["skipped_samples"]} == {"missing", "corrupt", "two_placeholders"}
    # sizes of every image that opened: the 12 good ones and the 6:1 one of the over-long sample (the sample with two
    # placeholders is refused before its image is read)
    sizes = [Image.open(os.path.join(img_dir, s["image"])).size for s in read_samples(str(path))[:12]]
    assert r["images"]["count"] == 13
    assert r["images"]["aspect_ratio_w_h"][">=4:1"] == 1 + sum(w / h >= 4 for w, h in sizes)
    assert r["sequence_length"]["histogram"][">112"] == 1 and r["sequence_length"]["p50_p90_p99_max"][3] > 200
    # 2 epochs of 16 samples in batches of 4: the trainer's 8 steps draw 32 usable samples, ~2.5 passes over 13
    plan = r["plan"]
    assert plan["steps"] == 8 and plan["usable_samples"] == 13
    assert abs(plan["passes_over_usable"] - 32 / 13) < 1e-6
    assert "skipped: 3 (18.75%)" in out and "missing image" in out and "truncated (text beyond max_length 112): 1" \
        in out
    assert "plan: 8 steps of global batch 4" in out


def test_check_data_on_sliced_images_counts_slices_and_budget_overflows(synthetic_data, tmp_path, capsys):
    """UHD slicing: slices per image, and a sample whose image tokens the length budget would cut is an overflow."""
    from uhd_jax.cli.check_data import main

    d = synthetic_data
    report = tmp_path / "report.json"
    argv = ["--config", os.path.join(REPO, "uhd_jax", "configs", "uhd_v1.py") + ":tiny", "--stage", "sft",
            "--data", f"sft={d['train']['sft']}:{d['images']}", "--workers", "0", "--limit", "10",
            "--report", str(report), f"--config.data_root={d['root']}", "--config.tokenizer=tokenizer",
            "--config.model.llm.vocab_size=640", "--config.stages.sft.max_length=200"]
    assert main(argv) == 0
    r = json.loads(report.read_text())
    assert r["samples"] == 10 and r["plan"]["samples_per_epoch"] == 48   # a subset; the plan counts the whole file
    assert sum(r["slices_per_image"].values()) == 10 and max(map(int, r["slices_per_image"])) <= 3
    # 200 tokens hold the overview and at most one slice of 16 tokens: images cut into more are overflows
    assert r["image_token_overflows"] == r["skipped"].get("image tokens beyond max_length", 0) > 0
    assert "image-token budget overflows" in capsys.readouterr().out


def test_the_record_maker_pickles_for_grain_workers(synthetic_data):
    from uhd_jax.data.check import InspectSample
    from uhd_jax.data.pipeline import PreparerFactory, Source

    d = synthetic_data
    factory = PreparerFactory(tuple(dict(tokenizer_path=d["tokenizer"], template="vicuna_v1", max_length=96,
                                         tokens_per_image=16, image_size=56).items()))
    inspect = pickle.loads(pickle.dumps(InspectSample(factory(Source(d["train"]["sft"], d["images"])), 0)))
    sample = read_samples(d["train"]["sft"])[0]
    record = inspect((0, sample, 0))
    assert record["id"] == sample["id"] and record["length"] > 16 and len(record["image_sizes"]) == 1


def test_check_data_mistakes(synthetic_data, tmp_path, capsys):
    from uhd_jax.cli.check_data import main

    base = ["--config", TINY, f"--config.data_root={synthetic_data['root']}", "--config.tokenizer=tokenizer"]
    assert_mistake(capsys, main, base + ["--stage", "sfft"], "--stage sfft: unknown stage")
    err = assert_mistake(capsys, main, base + ["--stage", "sft", "--data", "sft=nope.json:imgz",
                                               "--config.tokenizer=no_tok"], "problems")
    assert "config.tokenizer" in err and os.path.abspath("nope.json") in err and os.path.abspath("imgz") in err
    assert_mistake(capsys, main, base + ["--stage", "sft", "--data", "sft"], "write STAGE=FILE.json:IMAGE_FOLDER")
