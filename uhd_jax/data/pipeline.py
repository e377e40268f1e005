"""Grain input pipeline: LLaVA JSON sources -> seeded shuffle -> per-process shard -> preparation (in Grain worker
processes) -> static batches with skip accounting (at max_length, or grouped by length into a few static lengths:
`buckets.py`) -> prefetch. The iterator state is checkpointable.

Order of operations: each source is tagged and prepared lazily; an epoch holds round(weight x size) samples of every
source (weight 1: each sample once; 2: twice; 0.5: a seeded half), concatenated; the epoch is shuffled with a seed and
repeated (a new order each epoch), then process p takes elements p, p+P, ... So all processes agree on the global
order and their shards are disjoint. (Grain's `MapDataset.mix` is not used: its length is min_i(size_i / weight_i),
so with equal weights the larger files were cut to the smallest one's size and their tails never trained.)
"""
from __future__ import annotations

import collections
import dataclasses
import os
import signal
import threading
import time
from typing import Sequence

import grain
import jax

from uhd_jax.cli_errors import UserError
from uhd_jax.data.batch import BatchShape, collate
from uhd_jax.data.buckets import LengthBucketBatch, bucket_lengths
from uhd_jax.data.dataset import SamplePreparer, read_samples


@dataclasses.dataclass(frozen=True)
class Source:
    json: str
    image_folder: str
    weight: float = 1.0   # samples of this source per epoch, as a multiple of its size


def source_epoch_samples(size: int, weight: float) -> int:
    """How many samples of a source of `size` one epoch holds (at least one)."""
    return max(1, round(size * weight))


def _weighted(ds: grain.MapDataset, size: int, weight: float, seed: int) -> grain.MapDataset:
    """`ds` repeated whole floor(weight) times plus a seeded subset for the fraction (never the file's head)."""
    n = source_epoch_samples(size, weight)
    if n == size:
        return ds
    whole, rest = divmod(n, size)
    parts = [ds] * whole + ([ds.shuffle(seed=seed)[:rest]] if rest else [])
    return parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)


def _with_index(index, sample):
    return (index, sample)


def _with_position(index, position_and_sample):
    """(index, sample, position in its file): `index` grows across epochs (the augmentation's seed), the position
    names a sample without an id."""
    position, sample = position_and_sample
    return (index, sample, position)


def exit_with_parent(worker_index: int = 0, worker_count: int = 0, poll_s: float = 0.5):
    """Grain worker init: the worker ends when its parent does, however the parent died (a SIGKILL or a SIGTERM's
    default action runs no cleanup, and each orphan holds ~0.5 GB). Ctrl-C reaches the whole process group; the
    parent handles it (checkpoint, then closes its workers), so workers ignore it instead of dying mid-batch.
    Polling the parent pid, not PR_SET_PDEATHSIG: Grain starts workers from helper threads, and that signal fires
    when the starting thread ends."""
    del worker_index, worker_count
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


@dataclasses.dataclass(frozen=True)
class _TagEpoch:
    epoch_length: int

    def __call__(self, index, example):
        return dict(example, epoch=index // self.epoch_length)


def skip_kinds(skipped) -> dict:
    """{'bad sample': n, 'tokenization mismatch': m, ...} from (id, reason) pairs."""
    return dict(collections.Counter(reason.split(":")[0] for _, reason in skipped))


class DataExhausted(UserError):
    """Every sample in a long run was skipped: the data or its config is wrong, not a few samples."""


class _BatchIterator(grain.DatasetIterator):
    def __init__(self, parent, shape: BatchShape, max_consecutive_skips: int, collate_fn=collate):
        super().__init__(parent)
        self._shape = shape
        self._max_skips = max_consecutive_skips
        self._collate = collate_fn

    def __next__(self):
        good, skipped, truncated, epoch, streak = [], [], 0, 0, 0
        while len(good) < self._shape.batch_size:
            ex = next(self._parent)
            epoch = max(epoch, ex["epoch"])
            if "skip" in ex:
                skipped.append((ex["id"], ex["skip"]))
                streak += 1
                if streak >= self._max_skips:
                    raise DataExhausted(f"the last {streak} samples were all skipped "
                                        f"({skip_kinds(skipped[-streak:])}); e.g. "
                                        f"{skipped[-1][0]}: {skipped[-1][1]}. Check the data config "
                                        f"(paths, template, max_length).")
                continue
            streak = 0
            truncated += int(ex["truncated"])
            good.append(ex)
        meta = {"ids": [ex["id"] for ex in good], "skipped": skipped, "truncated": truncated, "epoch": epoch}
        return {"arrays": self._collate(good, self._shape), "meta": meta}

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


class SkipCountingBatch(grain.IterDataset):
    """Collects `batch_size` good examples per batch (`collate_fn(examples, shape)` -> arrays); the skipped ones ride
    along in `meta['skipped']`."""

    def __init__(self, parent, shape, max_consecutive_skips: int = 1000, collate_fn=collate):
        super().__init__(parent)
        self._shape = shape
        self._max_skips = max_consecutive_skips
        self._collate = collate_fn

    def __iter__(self):
        return _BatchIterator(self._parent.__iter__(), self._shape, self._max_skips, self._collate)


def prepared_dataset(sources: Sequence[Source], make_preparer, *, seed: int, num_epochs: int | None = None,
                     process_index: int | None = None, process_count: int | None = None) -> grain.MapDataset:
    """The shuffled, sharded MapDataset of prepared examples (dicts with arrays, or a 'skip' reason)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    parts, total = [], 0
    for i, src in enumerate(sources):
        samples = read_samples(src.json)
        if not samples:   # Grain would repeat an empty dataset forever or stop with a bare StopIteration
            raise UserError(f"data file {src.json} holds no samples (an empty JSON list)")
        # (position, sample) pairs, never the bare sample: Grain drops a None element (a JSON `null`) silently,
        # where it must be counted as a skip like any other malformed sample.
        part = grain.MapDataset.source(list(enumerate(samples))).map_with_index(_with_position)
        part = _weighted(part, len(samples), src.weight, seed=seed + 7919 * (i + 1))
        total += len(part)
        parts.append(part.map(make_preparer(src)))
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
    epoch_length = total
    ds = ds.shuffle(seed=seed).repeat(num_epochs)
    ds = ds[process_index::process_count]
    return ds.map_with_index(_TagEpoch(max(1, epoch_length // process_count)))


def make_iterator(sources: Sequence[Source], make_preparer, shape: BatchShape, *, seed: int,
                  num_epochs: int | None = None, num_workers: int = 0, prefetch: int = 2,
                  process_index: int | None = None, process_count: int | None = None,
                  length_buckets: tuple = (), length_window: int = 8):
    """Batches of `shape`; with `length_buckets` (see `buckets.py`), grouped by length within windows of
    `length_window` batches and each padded to the smallest bucket (or `shape.max_length`) that holds it."""
    ds = prepared_dataset(sources, make_preparer, seed=seed, num_epochs=num_epochs, process_index=process_index,
                          process_count=process_count)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=8))
    if length_buckets:
        it_ds = LengthBucketBatch(it_ds, shape, bucket_lengths(shape.max_length, length_buckets),
                                  window_batches=length_window, seed=seed)
    else:
        it_ds = SkipCountingBatch(it_ds, shape)
    if num_workers > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                                per_worker_buffer_size=prefetch),
                                  worker_init_fn=exit_with_parent)
    return iter(it_ds)


@dataclasses.dataclass(frozen=True)
class PreparerFactory:
    """Builds the per-source SamplePreparer from the data config (module level: picklable for Grain workers)."""

    kwargs: tuple

    def __call__(self, src: Source) -> SamplePreparer:
        return SamplePreparer(image_folder=src.image_folder, source=src.json, **dict(self.kwargs))
