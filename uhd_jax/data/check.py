"""A dry run of a stage's data (uhd-check-data): every sample through the training pipeline's own preparation
(`SamplePreparer`, or the JBU stage's `JBUImagePreparer`) in Grain workers, summarised instead of batched: why
samples would be skipped, image sizes and aspect ratios, slices per image, sequence lengths against `max_length`.

The preparers record what they saw in a `stats` dict (see `SamplePreparer.prepare`); nothing here re-implements a
check, so the counts are the ones training would see (before the random 10% slice augmentation, which draws from the
sample's index as in the first epoch).
"""
from __future__ import annotations

import bisect
import collections
import dataclasses
from typing import Any, Sequence

import grain
import numpy as np

from uhd_jax.data.dataset import read_samples
from uhd_jax.data.pipeline import _with_index, _with_position, exit_with_parent

# Long side in pixels and width/height: bucket edges (the last bucket is open).
SIDE_EDGES = (256, 512, 768, 1024, 1536, 2048, 4096)
ASPECT_EDGES = ((1 / 4, "1:4"), (1 / 2, "1:2"), (3 / 4, "3:4"), (4 / 3, "4:3"), (2, "2:1"), (4, "4:1"))
# Skip kinds that are an image-token budget overflow: the sample's image tokens do not fit the model's fixed slots.
BUDGET_KINDS = ("image tokens beyond max_length", "image budget")
EXAMPLES_PER_KIND = 5


@dataclasses.dataclass(frozen=True)
class InspectSample:
    """Grain map (module level: picklable for workers): (index, sample, position) of source `source` -> a small
    record of what preparing it found; the pixel arrays stay in the worker."""

    preparer: Any
    source: int

    def __call__(self, item) -> dict:
        stats: dict = {}
        out = self.preparer(item, stats)
        record = {"source": self.source, "id": out["id"], **stats}
        if "skip" in out:
            record["skip"] = out["skip"]
            record.setdefault("kind", out["skip"].split(":")[0])
        return record


def _bucket(value: float, edges: Sequence[float], labels: Sequence[str]) -> str:
    return labels[bisect.bisect_right(list(edges), value)]


def _side_labels():
    lows = (0,) + SIDE_EDGES
    return [f"{lo}-{hi - 1}" for lo, hi in zip(lows, SIDE_EDGES)] + [f">={SIDE_EDGES[-1]}"]


def _aspect_labels():
    names = [n for _, n in ASPECT_EDGES]
    return [f"<{names[0]}"] + [f"{a}..{b}" for a, b in zip(names, names[1:])] + [f">={names[-1]}"]


def _length_labels(max_length: int):
    quarters = [max_length * k // 4 for k in range(5)]
    return [f"{a + 1}-{b}" for a, b in zip(quarters, quarters[1:])] + [f">{max_length}"]


class DataSummary:
    """Counts over the records of `InspectSample` (or of the JBU preparer)."""

    def __init__(self, max_length: int = 0):
        self.max_length = max_length
        self.samples = 0
        self.per_source = collections.Counter()
        self.skipped = collections.Counter()
        self.examples: dict[str, list] = collections.defaultdict(list)
        self.skipped_ids: list[tuple[str, str]] = []
        self.sides = collections.Counter()
        self.aspects = collections.Counter()
        self.long_sides: list[int] = []
        self.slices = collections.Counter()
        self.lengths: list[int] = []
        self.length_hist = collections.Counter()
        self.truncated = 0

    def add(self, record: dict) -> None:
        self.samples += 1
        self.per_source[record.get("source", 0)] += 1
        for w, h in record.get("image_sizes", ()):
            self.long_sides.append(max(w, h))
            self.sides[_bucket(max(w, h), SIDE_EDGES, _side_labels())] += 1
            self.aspects[_bucket(w / h, [e for e, _ in ASPECT_EDGES], _aspect_labels())] += 1
        for n in record.get("slices", ()):
            self.slices[n] += 1
        if "length" in record and self.max_length:
            self.lengths.append(record["length"])
            quarters = [self.max_length * k // 4 for k in range(1, 5)]
            self.length_hist[_bucket(record["length"] - 1, quarters, _length_labels(self.max_length))] += 1
        if "skip" in record:
            kind = record["kind"]
            self.skipped[kind] += 1
            self.skipped_ids.append((record["id"], record["skip"]))
            if len(self.examples[kind]) < EXAMPLES_PER_KIND:
                self.examples[kind].append([record["id"], record["skip"]])
        elif record.get("truncated"):
            self.truncated += 1

    @property
    def usable(self) -> int:
        return self.samples - sum(self.skipped.values())

    def as_dict(self) -> dict:
        def ordered(counter, labels):
            return {k: counter.get(k, 0) for k in labels}

        lengths = np.asarray(self.lengths or [0])
        sides = np.asarray(self.long_sides or [0])
        return {
            "samples": self.samples, "usable": self.usable, "skipped": dict(self.skipped.most_common()),
            "skip_examples": dict(self.examples),
            "image_token_overflows": sum(self.skipped[k] for k in BUDGET_KINDS),
            "truncated": self.truncated,
            "images": {"count": len(self.long_sides), "long_side": ordered(self.sides, _side_labels()),
                       "aspect_ratio_w_h": ordered(self.aspects, _aspect_labels()),
                       "long_side_min_median_max": [int(sides.min()), int(np.median(sides)), int(sides.max())]},
            "slices_per_image": {str(k): v for k, v in sorted(self.slices.items())},
            "sequence_length": {"max_length": self.max_length,
                                "histogram": ordered(self.length_hist, _length_labels(self.max_length))
                                if self.max_length else {},
                                "p50_p90_p99_max": [int(np.percentile(lengths, q)) for q in (50, 90, 99)]
                                + [int(lengths.max())]},
        }


def inspect_dataset(parts: Sequence[grain.MapDataset], *, workers: int = 0, limit: int = 0, seed: int = 0):
    """Iterate the concatenated record datasets (in Grain workers when `workers`); `limit`: a seeded random subset
    of that many samples."""
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(list(parts))
    if limit and limit < len(ds):
        ds = ds.shuffle(seed=seed)[:limit]
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=16))
    if workers > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=16),
                                  worker_init_fn=exit_with_parent)
    return len(ds), iter(it_ds)


def conversation_parts(sources, make_preparer) -> tuple[list, list[int]]:
    """Per source, the MapDataset of its records (each sample once, in file order) and its sample count."""
    parts, counts = [], []
    for i, src in enumerate(sources):
        samples = read_samples(src.json)
        counts.append(len(samples))
        parts.append(grain.MapDataset.source(list(enumerate(samples))).map_with_index(_with_position)
                     .map(InspectSample(make_preparer(src), i)))
    return parts, counts


@dataclasses.dataclass(frozen=True)
class InspectImage:
    preparer: Any

    def __call__(self, item) -> dict:
        stats: dict = {}
        out = self.preparer(item, stats)
        record = {"id": out["id"], **stats}
        if "skip" in out:
            record["skip"] = out["skip"]
        return record


def image_parts(paths: list[str], preparer) -> list:
    return [grain.MapDataset.source(list(paths)).map_with_index(_with_index).map(InspectImage(preparer))]
