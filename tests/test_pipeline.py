"""Grain pipeline: determinism, disjoint process shards, iterator state, batch schema, and bad inputs as counted skips."""
import collections
import json
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from uhd_jax.data.batch import BatchShape
from uhd_jax.data.dataset import SamplePreparer, read_samples
from uhd_jax.data.pipeline import PreparerFactory, Source, make_iterator

SHAPE = BatchShape(batch_size=4, max_length=96, max_images=1, image_size=56)


def factory(tokenizer, template="vicuna_v1", max_length=96):
    return PreparerFactory(tuple(dict(tokenizer_path=tokenizer, template=template, max_length=max_length,
                                      tokens_per_image=16, image_size=56).items()))


def sft_source(d):
    return [Source(d["train"]["sft"], d["images"])]


def take(it, n):
    return [next(it) for _ in range(n)]


def test_same_seed_same_batches_other_seed_other_order(synthetic_data):
    d = synthetic_data
    a = take(make_iterator(sft_source(d), factory(d["tokenizer"]), SHAPE, seed=3), 3)
    b = take(make_iterator(sft_source(d), factory(d["tokenizer"]), SHAPE, seed=3), 3)
    c = take(make_iterator(sft_source(d), factory(d["tokenizer"]), SHAPE, seed=4), 3)
    assert [x["meta"]["ids"] for x in a] == [x["meta"]["ids"] for x in b]
    for x, y in zip(a, b):
        for k in x["arrays"]:
            np.testing.assert_array_equal(x["arrays"][k], y["arrays"][k])
    assert [x["meta"]["ids"] for x in a] != [x["meta"]["ids"] for x in c]


def test_two_processes_get_disjoint_shards_covering_the_epoch(synthetic_data):
    d = synthetic_data
    seen = []
    for p in range(2):
        it = make_iterator(sft_source(d), factory(d["tokenizer"]), SHAPE, seed=0, num_epochs=1, process_index=p,
                           process_count=2)
        ids = [i for batch in take(it, 6) for i in batch["meta"]["ids"]]  # 24 of each process's 24 samples
        assert len(ids) == len(set(ids)) == 24
        seen.append(set(ids))
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 48


def test_iterator_state_round_trips(synthetic_data):
    d = synthetic_data
    it = make_iterator(sft_source(d), factory(d["tokenizer"]), SHAPE, seed=1)
    take(it, 2)
    state = it.get_state()
    expected = [b["meta"]["ids"] for b in take(it, 3)]
    fresh = make_iterator(sft_source(d), factory(d["tokenizer"]), SHAPE, seed=1)
    fresh.set_state(state)
    assert [b["meta"]["ids"] for b in take(fresh, 3)] == expected


def test_worker_processes_produce_batches_and_resumable_state(synthetic_data):
    d = synthetic_data
    it = make_iterator(sft_source(d), factory(d["tokenizer"]), SHAPE, seed=2, num_workers=2)
    first = take(it, 2)
    state = it.get_state()
    expected = [b["meta"]["ids"] for b in take(it, 2)]
    assert all(b["arrays"]["input_ids"].shape == (4, 96) for b in first)
    fresh = make_iterator(sft_source(d), factory(d["tokenizer"]), SHAPE, seed=2, num_workers=2)
    fresh.set_state(state)
    assert [b["meta"]["ids"] for b in take(fresh, 2)] == expected


def test_batch_schema_and_label_alignment(synthetic_data):
    d = synthetic_data
    batch = next(make_iterator(sft_source(d), factory(d["tokenizer"]), SHAPE, seed=0))
    a = batch["arrays"]
    assert a["pixel_values"].shape == (4, 1, 56, 56, 3) and a["image_valid"].all()
    for row in range(4):
        n = int(a["token_valid"][row].sum())
        assert a["token_valid"][row, :n].all() and not a["token_valid"][row, n:].any()
        np.testing.assert_array_equal(a["targets"][row, :n - 1], a["input_ids"][row, 1:n])
        slots = np.flatnonzero(a["image_token_map"][row] >= 0)
        np.testing.assert_array_equal(a["image_token_map"][row, slots], np.arange(16))
        assert not a["loss_mask"][row, slots].any()  # image slots are never targets...
        assert not a["loss_mask"][row, slots - 1].any()  # ...nor predicted
        assert a["loss_mask"][row].any() and not a["loss_mask"][row, n - 1:].any()


def write_png_header(path, w, h):
    """A small file whose PNG header claims w x h pixels (a decompression bomb's shape; the data is cut short)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
                + chunk(b"IEND", b""))


def test_bad_inputs_are_counted_skips_with_reasons(synthetic_data, tmp_path):
    d = synthetic_data
    good = read_samples(d["train"]["sft"])[:8]
    img_dir = tmp_path / "imgs"
    os.makedirs(img_dir)
    Image.new("RGB", (64, 64)).save(img_dir / "ok.png")
    (img_dir / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"garbage" * 20)
    (img_dir / "empty.png").write_bytes(b"")
    Image.new("RGB", (1, 1)).save(img_dir / "tiny.png")
    write_png_header(img_dir / "huge.png", 20000, 20000)
    q = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]
    bad = [
        {"id": "missing", "image": "nope.png", "conversations": q},
        {"id": "corrupt", "image": "corrupt.jpg", "conversations": q},
        {"id": "empty", "image": "empty.png", "conversations": q},
        {"id": "tiny", "image": "tiny.png", "conversations": q},
        {"id": "huge", "image": "huge.png", "conversations": q},
        {"id": "schema", "image": "ok.png", "conversations": "not a list"},
        {"id": "two_images", "image": "ok.png", "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhat?"}, {"from": "gpt", "value": "x"}]},
    ]
    for s in good:  # good samples point into the synthetic image folder
        s["image"] = os.path.relpath(os.path.join(d["images"], s["image"]), img_dir)
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(good + bad))
    it = make_iterator([Source(str(path), str(img_dir))], factory(d["tokenizer"]), SHAPE, seed=0, num_epochs=1)
    skipped, trained = {}, []
    for batch in take(it, 2):  # 8 good samples = 2 batches; the 7 bad ones are skipped on the way
        skipped.update(dict(batch["meta"]["skipped"]))
        trained += batch["meta"]["ids"]
    assert sorted(trained) == sorted(s["id"] for s in good)
    expected = {"missing": "image file not found", "corrupt": "cannot decode image", "empty": "empty (0 bytes)",
                "tiny": "below data.min_image_area", "huge": "decompression-bomb limit",
                "schema": "'conversations' must be a non-empty list",
                "two_images": "2 <image> placeholder(s) but the sample has 1 image(s)"}
    assert set(skipped) == set(expected)
    for sid, needle in expected.items():
        assert needle in skipped[sid], (sid, skipped[sid])
    assert "huge.png" in skipped["huge"] and "nope.png" in skipped["missing"]


def test_image_tokens_cut_by_the_budget_skip_but_text_truncates(synthetic_data):
    d = synthetic_data
    prep = SamplePreparer(tokenizer_path=d["tokenizer"], image_folder=d["images"], template="llavar_v1",
                          max_length=20, tokens_per_image=16, image_size=56)
    long_q = "word " * 30
    img = read_samples(d["train"]["sft"])[0]["image"]
    late = {"id": "late", "image": img, "conversations": [
        {"from": "human", "value": long_q + "<image>"}, {"from": "gpt", "value": "x"}]}
    assert "image tokens would be cut" in prep((0, late))["skip"]
    early = SamplePreparer(tokenizer_path=d["tokenizer"], image_folder=d["images"], template="vicuna_v1",
                           max_length=64, tokens_per_image=16, image_size=56)
    sample = {"id": "s", "image": img, "conversations": [
        {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "answer " * 40}]}
    out = early((0, sample))
    assert "skip" not in out and out["truncated"] and len(out["ids"]) == 64


def test_file_level_errors_name_the_file(tmp_path):
    from uhd_jax.cli_errors import UserError

    (tmp_path / "d.json").write_text(json.dumps({"not": "a list"}))
    with pytest.raises(UserError, match="d.json: expected a JSON list"):
        read_samples(str(tmp_path / "d.json"))
    with pytest.raises(UserError, match="nope.json: not found"):
        read_samples(str(tmp_path / "nope.json"))


def test_a_dataset_that_skips_everything_is_an_error_not_a_hang(synthetic_data):
    from uhd_jax.data.pipeline import DataExhausted

    d = synthetic_data
    it = make_iterator(sft_source(d), factory(d["tokenizer"], max_length=24), SHAPE, seed=0)
    with pytest.raises(DataExhausted, match="last 1000 samples were all skipped .* image tokens would be cut"):
        next(it)


def test_mixture_of_sources_follows_weights(synthetic_data, tmp_path):
    d = synthetic_data
    samples = read_samples(d["train"]["sft"])
    for name, part in (("a", samples[:24]), ("b", samples[24:])):
        (tmp_path / f"{name}.json").write_text(json.dumps([dict(s, id=f"{name}-{s['id']}") for s in part]))
    sources = [Source(str(tmp_path / "a.json"), d["images"], 3.0), Source(str(tmp_path / "b.json"), d["images"], 1.0)]
    ids = [i for b in take(make_iterator(sources, factory(d["tokenizer"]), SHAPE, seed=0), 6) for i in b["meta"]["ids"]]
    share_a = sum(i.startswith("a-") for i in ids) / len(ids)
    assert 0.6 <= share_a <= 0.9, share_a  # 3:1 weights


def test_null_broken_unicode_and_id_less_samples_are_counted_skips_in_workers(synthetic_data, tmp_path):
    """A JSON `null` was dropped by Grain without a count; a lone surrogate ("caf\\udcff", a valid JSON escape)
    crashed the tokenizer and with it every run at the same step. Both are counted skips, named by id or by
    position in their file (not by a position counted across epochs), in worker processes too."""
    d = synthetic_data
    good = read_samples(d["train"]["sft"])[:8]
    q = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "caf\udcff"}]
    no_id = {k: v for k, v in good[0].items() if k != "id"}
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(good + [None, dict(good[1], id="surrogate", conversations=q), dict(no_id, conversations=q)]))
    assert "\\udcff" in path.read_text()   # the file itself is plain ASCII JSON
    it = make_iterator([Source(str(path), d["images"])], factory(d["tokenizer"]), SHAPE, seed=0, num_epochs=2,
                       num_workers=1)
    try:
        batches = take(it, 4)   # both epochs: the skips come again with the same names
    finally:
        it.close()
    skipped = [s for b in batches for s in b["meta"]["skipped"]]
    assert sorted(i for b in batches for i in b["meta"]["ids"]) == sorted(2 * [s["id"] for s in good])
    assert sorted(sid for sid, _ in skipped) == sorted(2 * ["odd.json#8", "surrogate", "odd.json#10"])
    reasons = dict(skipped)
    assert "sample is a NoneType" in reasons["odd.json#8"]
    for sid in ("surrogate", "odd.json#10"):
        assert "conversations[1].value holds invalid Unicode: a lone surrogate U+DCFF at character 3" in reasons[sid]


def test_a_data_file_that_is_not_utf8_names_the_file_and_the_byte(tmp_path):
    from uhd_jax.cli_errors import UserError

    raw = b'[{"id": "a",\n "conversations": [{"from": "human", "value": "caf\xe9"}]}]'
    (tmp_path / "latin1.json").write_bytes(raw)
    offset = raw.index(b"\xe9")
    with pytest.raises(UserError, match=rf"latin1.json is not UTF-8: byte 0xe9 at byte offset {offset} \(line 2\)"):
        read_samples(str(tmp_path / "latin1.json"))


def test_an_empty_data_file_is_an_error_not_an_endless_or_bare_stop(synthetic_data, tmp_path):
    from uhd_jax.cli_errors import UserError

    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(UserError, match="empty.json holds no samples"):
        make_iterator([Source(str(tmp_path / "empty.json"), synthetic_data["images"])],
                      factory(synthetic_data["tokenizer"]), SHAPE, seed=0)


def test_data_workers_end_with_their_parent_even_when_it_is_killed(tmp_path):
    """A SIGKILL (or SIGTERM's default action) runs no cleanup: the worker notices its parent is gone."""
    import signal
    import subprocess
    import sys
    import time

    child = ("from uhd_jax.data.pipeline import exit_with_parent; exit_with_parent(poll_s=0.1); "
             "import time; print('ready', flush=True); time.sleep(120)")
    parent = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {child!r}]); "
              f"print(p.pid, flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    worker = int(proc.stdout.readline())
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.time() + 10
    while time.time() < deadline and os.path.exists(f"/proc/{worker}") and \
            open(f"/proc/{worker}/stat").read().split()[2] != "Z":
        time.sleep(0.1)
    alive = os.path.exists(f"/proc/{worker}") and open(f"/proc/{worker}/stat").read().split()[2] != "Z"
    assert not alive, "the worker outlived its killed parent"


def _id_of(index_sample_position):
    _, sample, _ = index_sample_position
    return {"id": sample["id"]}


def test_an_epoch_holds_every_source_by_its_weight_not_cut_to_the_smallest(tmp_path):
    """Grain's mix stopped at min(size / weight): with equal weights a 10-sample and a 4-sample file gave 4 + 4 per
    epoch and the larger file's tail never trained. An epoch now holds round(weight x size) samples of each source:
    weight 1 all of them once, 2 each twice, 0.5 a seeded half that is not the file's head."""
    from uhd_jax.data.pipeline import prepared_dataset

    files = {}
    for name, n in (("big", 10), ("small", 4), ("twice", 3), ("half", 8)):
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps([{"id": f"{name}{i}", "conversations": []} for i in range(n)]))
    sources = [Source(str(files["big"]), "", 1.0), Source(str(files["small"]), "", 1.0),
               Source(str(files["twice"]), "", 2.0), Source(str(files["half"]), "", 0.5)]
    ds = prepared_dataset(sources, lambda src: _id_of, seed=0, num_epochs=1, process_index=0, process_count=1)
    ids = collections.Counter(ex["id"] for ex in ds)
    assert len(ds) == 10 + 4 + 6 + 4
    assert all(ids[f"big{i}"] == 1 for i in range(10)) and all(ids[f"small{i}"] == 1 for i in range(4))
    assert all(ids[f"twice{i}"] == 2 for i in range(3))
    half = sorted(int(k[4:]) for k in ids if k.startswith("half"))
    assert len(half) == 4 and all(ids[f"half{i}"] == 1 for i in half) and half != [0, 1, 2, 3]
    # two processes split the same epoch disjointly
    shards = [[ex["id"] for ex in prepared_dataset(sources, lambda src: _id_of, seed=0, num_epochs=1,
                                                   process_index=p, process_count=2)] for p in (0, 1)]
    assert collections.Counter(shards[0] + shards[1]) == ids
