"""Length buckets: grouping by length within windows, bounded static lengths (one compile per bucket), determinism,
exact resume, every sample once per epoch, less padding than fixed-length batches, bad settings found in preflight."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.config_helpers import on_synthetic_data
from uhd_jax.cli_errors import UserError
from uhd_jax.data.batch import BatchShape
from uhd_jax.data.buckets import bucket_lengths, bucket_of, pad_batch, window_batches_order
from uhd_jax.data.dataset import read_samples
from uhd_jax.data.pipeline import PreparerFactory, Source, make_iterator
from uhd_jax.train.trainer import PreflightError, preflight

SHAPE = BatchShape(batch_size=4, max_length=96, max_images=1, image_size=56)
BUCKETS = (80,)   # with max_length: two static lengths, 80 and 96


def factory(tokenizer):
    return PreparerFactory(tuple(dict(tokenizer_path=tokenizer, template="vicuna_v1", max_length=96,
                                      tokens_per_image=16, image_size=56).items()))


def bucketed(d, seed=0, window=3, num_epochs=1, **kw):
    return make_iterator([Source(d["train"]["sft"], d["images"])], factory(d["tokenizer"]), SHAPE, seed=seed,
                         num_epochs=num_epochs, length_buckets=BUCKETS, length_window=window, **kw)


def take(it, n):
    return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def lengths(synthetic_data):
    """Each synthetic SFT sample's token length (image tokens included) as the preparer makes it."""
    d = synthetic_data
    src = Source(d["train"]["sft"], d["images"])
    prep = factory(d["tokenizer"])(src)
    out = {}
    for i, s in enumerate(read_samples(src.json)):
        ex = prep((i, s, i))
        out[ex["id"]] = len(ex["ids"])
    return out


def test_grouping_and_padding_on_hand_worked_lengths():
    # Sorted (stable) lengths 1 2 | 3 5 | 7 9 at positions 1 5 | 3 0 | 4 2; the three runs come out in some order.
    runs = window_batches_order([5, 1, 9, 3, 7, 2], 2, seed=0, window=0)
    assert sorted(runs) == [[1, 5], [3, 0], [4, 2]]
    # A seven-sample window drops its tail: 6 of the 7 in three pairs, the longest (9) left out.
    assert sorted(p for run in window_batches_order([5, 1, 9, 3, 7, 2, 4], 2, 0, 0) for p in run) == [0, 1, 3, 4, 5, 6]
    assert window_batches_order([5, 1, 9, 3, 7, 2], 2, 0, 0) == runs                   # deterministic
    assert {str(window_batches_order(list(range(40)), 2, 0, w)) for w in range(4)}.__len__() > 1  # per window
    assert bucket_lengths(10, (8, 4)) == (4, 8, 10) and bucket_lengths(10, ()) == (10,)
    assert [bucket_of(n, (4, 8, 10)) for n in (1, 4, 5, 8, 9, 10)] == [4, 4, 8, 8, 10, 10]
    # Pairs padded to 4, 8 and 10: 27 real tokens in 44 slots, against 60 at a fixed length of 10.
    assert 1 - 27 / 44 < 1 - 27 / 60
    for bad in ((0,), (11,), (4.5,), (True,)):
        with pytest.raises(UserError, match="max_length=10"):
            bucket_lengths(10, bad)
    arrays = BatchShape(2, 3, 1, 4).zeros()
    arrays["input_ids"][:] = 7
    arrays["image_token_map"][:] = 2
    padded = pad_batch(arrays, 5)
    assert padded["input_ids"].tolist() == [[7, 7, 7, 0, 0]] * 2
    assert padded["image_token_map"].tolist() == [[2, 2, 2, -1, -1]] * 2
    assert padded["token_valid"].shape == (2, 5) and padded["pixel_values"] is arrays["pixel_values"]


def test_an_epoch_trains_every_sample_once_grouped_by_length_with_less_padding(synthetic_data, lengths):
    d = synthetic_data
    # The stream order the buckets read: the same seeded shuffle, batched as it comes.
    plain = make_iterator([Source(d["train"]["sft"], d["images"])], factory(d["tokenizer"]), SHAPE, seed=0,
                          num_epochs=1)
    stream = [i for b in take(plain, 12) for i in b["meta"]["ids"]]
    batches = list(bucketed(d))
    ids = [i for b in batches for i in b["meta"]["ids"]]
    assert len(batches) == 12 and sorted(ids) == sorted(stream) and len(set(ids)) == 48
    real = sum(lengths.values())
    expected_slots = 0
    for w in range(4):   # windows of 3 batches = 12 samples: sorted by length, cut in fours
        window = sorted(stream[12 * w:12 * (w + 1)], key=lambda i: lengths[i])   # sorted() is stable
        want = sorted(sorted(window[k:k + 4]) for k in range(0, 12, 4))
        got = sorted(sorted(b["meta"]["ids"]) for b in batches[3 * w:3 * (w + 1)])
        assert got == want, w
        expected_slots += sum(4 * (80 if max(lengths[i] for i in run) <= 80 else 96)
                              for run in (window[k:k + 4] for k in range(0, 12, 4)))
    for b in batches:
        a = b["arrays"]
        longest = max(lengths[i] for i in b["meta"]["ids"])
        assert a["input_ids"].shape[1] == b["meta"]["length"] == (80 if longest <= 80 else 96)
        assert [int(n) for n in a["token_valid"].sum(1)] == [lengths[i] for i in b["meta"]["ids"]]
    slots = sum(b["arrays"]["input_ids"].size for b in batches)
    assert slots == expected_slots and {b["meta"]["length"] for b in batches} == {80, 96}
    assert 1 - real / slots < 1 - real / (48 * 96)
    # Static shapes: a step jitted over these batches compiles once per bucket.
    step = jax.jit(lambda a: jax.tree_util.tree_map(jnp.sum, a))
    for b in batches:
        step(b["arrays"])
    assert step._cache_size() == 2


def test_same_seed_same_batches_and_a_restored_iterator_continues_exactly(synthetic_data):
    d = synthetic_data
    straight = take(bucketed(d, seed=5, num_epochs=None), 8)
    again = take(bucketed(d, seed=5, num_epochs=None), 8)
    other = take(bucketed(d, seed=6, num_epochs=None), 8)
    assert [b["meta"]["ids"] for b in straight] == [b["meta"]["ids"] for b in again]
    assert [b["meta"]["ids"] for b in straight] != [b["meta"]["ids"] for b in other]
    for k in (0, 1, 3, 4):   # before anything, mid-window, at a window's end, mid-window again
        it = bucketed(d, seed=5, num_epochs=None)
        take(it, k)
        state = it.get_state()
        fresh = bucketed(d, seed=5, num_epochs=None)
        fresh.set_state(state)
        for want, got in zip(straight[k:], take(fresh, 8 - k)):
            assert got["meta"]["ids"] == want["meta"]["ids"], k
            for key in want["arrays"]:
                np.testing.assert_array_equal(got["arrays"][key], want["arrays"][key])


def test_bad_buckets_are_found_before_training(synthetic_data, tmp_path):
    c = on_synthetic_data("configs/llava15.py:tiny", synthetic_data, max_length=112, init_from_stage="",
                          length_buckets=(64, 200), length_window=0)
    with pytest.raises(PreflightError) as e:
        preflight(c, str(tmp_path), ["sft"])
    assert "stages.sft.length_buckets (64, 200)" in str(e.value) and "max_length=112" in str(e.value)
