"""Length buckets: batches of samples of similar length, each padded to the smallest of a few static lengths that
holds its longest sample, instead of every row padded to the stage's `max_length`.

How batches form (deterministic from the seed, bounded memory, exact resume): the pipeline's shuffled stream of
prepared samples is read in windows of `window_batches` x batch_size good samples; a window is sorted by length
(stable: ties keep stream order) and cut into consecutive batches, whose order is then shuffled with a key from
(seed, window number), so a step's length does not creep up across a window. (LLaVA's `group_by_modality_length`
sorts within a global batch only, because it pads each device's micro-batch to its own longest sample; here every
row of a step shares one static length, so the grouping needs a wider window.) Each sample is emitted within the
window it arrived in: every sample of an epoch trains once, at most one window late.

The iterator state is the parent's position at the window's start, the window number and how many of its batches
were emitted: a restore re-reads (re-prepares) that window and skips what was emitted, so a resumed run sees the
same batches as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses

import grain
import numpy as np

from uhd_jax.cli_errors import UserError
from uhd_jax.data.batch import TEXT_KEYS, BatchShape, collate

# What padding holds in each text array (BatchShape.zeros' fill).
_PAD = {"image_token_map": -1}


def bucket_lengths(max_length: int, length_buckets, where: str = "length_buckets") -> tuple[int, ...]:
    """The sorted static lengths a stage pads to: `length_buckets` plus `max_length` (the longest a sample may be
    after truncation, so always a bucket). () -> (max_length,), i.e. every batch at max_length."""
    buckets = tuple(length_buckets or ())
    if any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 0 < b <= max_length for b in buckets):
        raise UserError(f"{where} {buckets!r}: expected token lengths in 1..max_length={max_length} (max_length is "
                        f"always the last bucket)")
    return tuple(sorted({int(b) for b in buckets} | {int(max_length)}))


def bucket_of(length: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds `length` tokens (callers truncate to the last bucket first)."""
    i = int(np.searchsorted(np.asarray(buckets), length, side="left"))
    if i == len(buckets):
        raise ValueError(f"a sample of {length} tokens exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


def window_batches_order(lengths, batch_size: int, seed: int, window: int) -> list[list[int]]:
    """Positions in a window of samples with `lengths`, grouped into batches of similar length: sorted by length
    (stable), cut into `batch_size` runs (a short tail is dropped: only the stream's last window has one), the runs
    shuffled with a key from (seed, window)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    runs = [order[i:i + batch_size].tolist() for i in range(0, len(order) - batch_size + 1, batch_size)]
    perm = np.random.default_rng([seed, window, 0x6C656E]).permutation(len(runs))
    return [runs[i] for i in perm]


def pad_batch(arrays: dict, length: int) -> dict:
    """Text arrays right-padded to `length` tokens (a longer bucket), filled as BatchShape.zeros fills padding."""
    out = dict(arrays)
    for k in TEXT_KEYS:
        x = arrays[k]
        if x.shape[1] < length:
            out[k] = np.pad(x, ((0, 0), (0, length - x.shape[1])), constant_values=_PAD.get(k, 0))
    return out


def example_length(ex: dict) -> int:
    return len(ex["ids"])


class _WindowIterator(grain.DatasetIterator):
    def __init__(self, parent, shape: BatchShape, buckets: tuple[int, ...], window_batches: int, seed: int,
                 max_consecutive_skips: int, collate_fn):
        super().__init__(parent)
        self._shape, self._buckets, self._seed = shape, buckets, seed
        self._window_size = window_batches * shape.batch_size
        self._max_skips = max_consecutive_skips
        self._collate = collate_fn
        self._window = 0          # number of the window being emitted
        self._start = None        # parent state where that window's reading began
        self._batches = []        # the window's batches (lists of examples), in emission order
        self._emitted = 0
        self._skipped = []        # skips met while reading the window: they ride on its first batch

    def _read_window(self):
        from uhd_jax.data.pipeline import DataExhausted, skip_kinds

        self._start = self._parent.get_state()
        good, skipped, streak = [], [], 0
        while len(good) < self._window_size:
            try:
                ex = next(self._parent)
            except StopIteration:
                break
            if "skip" in ex:
                skipped.append((ex["id"], ex["skip"], ex["epoch"]))
                streak += 1
                if streak >= self._max_skips:
                    raise DataExhausted(f"the last {streak} samples were all skipped "
                                        f"({skip_kinds(skipped[-streak:])}); e.g. {skipped[-1][0]}: "
                                        f"{skipped[-1][1]}. Check the data config (paths, template, max_length).")
                continue
            streak = 0
            good.append(ex)
        order = window_batches_order([example_length(ex) for ex in good], self._shape.batch_size, self._seed,
                                     self._window)
        if not order:
            raise StopIteration
        self._batches = [[good[i] for i in run] for run in order]
        self._skipped = skipped
        self._emitted = 0

    def __next__(self):
        if self._emitted == len(self._batches):
            if self._batches:
                self._window += 1
            self._read_window()
        examples = self._batches[self._emitted]
        skipped = self._skipped if self._emitted == 0 else []
        self._emitted += 1
        length = bucket_of(max(example_length(ex) for ex in examples), self._buckets)
        epoch = max([ex["epoch"] for ex in examples] + [e for _, _, e in skipped])
        meta = {"ids": [ex["id"] for ex in examples], "skipped": [(i, r) for i, r, _ in skipped],
                "truncated": sum(int(ex["truncated"]) for ex in examples), "epoch": epoch, "length": length}
        return {"arrays": self._collate(examples, dataclasses.replace(self._shape, max_length=length)), "meta": meta}

    def get_state(self):
        if self._start is None:   # nothing read yet: the next window starts where the parent stands
            return {"parent": self._parent.get_state(), "window": self._window, "emitted": 0}
        if self._emitted == len(self._batches):   # window done: the next one starts at the parent's position
            return {"parent": self._parent.get_state(), "window": self._window + 1, "emitted": 0}
        return {"parent": self._start, "window": self._window, "emitted": self._emitted}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._window, self._batches, self._emitted, self._start = state["window"], [], 0, None
        if state["emitted"]:
            self._read_window()
            self._emitted = state["emitted"]


class LengthBucketBatch(grain.IterDataset):
    """Batches of `shape.batch_size` good examples grouped by length within windows of `window_batches` batches,
    each collated at the smallest of `buckets` that holds its longest example (`meta['length']`)."""

    def __init__(self, parent, shape: BatchShape, buckets: tuple[int, ...], *, window_batches: int, seed: int,
                 max_consecutive_skips: int = 1000, collate_fn=collate):
        super().__init__(parent)
        if window_batches < 1:
            raise UserError(f"length_window {window_batches}: expected a number of batches >= 1")
        self._args = (shape, tuple(buckets), int(window_batches), int(seed), max_consecutive_skips, collate_fn)

    def __iter__(self):
        return _WindowIterator(self._parent.__iter__(), *self._args)
