"""Images for the JBU (VDIM) pretraining stage (spec uhd.md §4.4): every image under the stage's folders, resized
with torchvision's `Resize(S, NEAREST)` (shorter side to S) + `CenterCrop(S)`, scaled 1/255 and normalised with the
ImageNet mean/std (FeatUp's transform, not CLIP's). Grain pipeline with the same shuffle / shard / skip accounting /
checkpointable state as the conversation pipeline; unreadable images are counted skips naming the file.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import grain
import jax
import numpy as np
from PIL import Image

from uhd_jax.data.image_processing import normalize
from uhd_jax.data.images import SampleError, load_image
from uhd_jax.data.pipeline import SkipCountingBatch, _TagEpoch, _with_index, exit_with_parent
from uhd_jax.models.projectors.vdim import IMAGENET_MEAN, IMAGENET_STD

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def list_images(folder: str) -> list[str]:
    """Image files under `folder` (recursively), sorted so every process sees the same order."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"JBU stage image folder not found: {folder} (set stages.jbu.sources[].image_folder)")
    found = []
    for root, _, files in os.walk(folder):
        found += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not found:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return sorted(found)


def resize_short_side(size_wh: tuple[int, int], short: int) -> tuple[int, int]:
    """torchvision `Resize(int)`: the shorter side becomes `short`, the longer int(short * long / short_side)."""
    w, h = size_wh
    if w <= h:
        return short, int(short * h / w)
    return int(short * w / h), short


def center_crop_box(size_wh: tuple[int, int], crop: int) -> tuple[int, int, int, int]:
    """torchvision `CenterCrop(int)` box (left, top, right, bottom): offsets int(round((side - crop) / 2))."""
    w, h = size_wh
    left, top = int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))
    return left, top, left + crop, top + crop


def vdim_image(image: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) float32, ImageNet-normalised: FeatUp's Resize(size, NEAREST) + CenterCrop(size)."""
    image = image.convert("RGB").resize(resize_short_side(image.size, size), Image.Resampling.NEAREST)
    return normalize(image.crop(center_crop_box(image.size, size)), IMAGENET_MEAN, IMAGENET_STD)


@dataclasses.dataclass(frozen=True)
class JBUImagePreparer:
    """(index, path) -> {'id', 'image', 'truncated'} or {'id', 'skip'} (module level: picklable for Grain workers)."""

    size: int
    max_pixels: int = 89_478_485
    min_area: int = 16

    def __call__(self, index_and_path, stats: dict | None = None) -> dict:
        """`stats` (uhd-check-data): receives the file's `image_sizes` [(w, h)], or a skip's `kind`."""
        _, path = index_and_path
        try:
            image = load_image(path, max_pixels=self.max_pixels, min_area=self.min_area)
            if stats is not None:
                stats["image_sizes"] = [image.size]
            return {"id": path, "image": vdim_image(image, self.size), "truncated": 0}
        except SampleError as e:
            if stats is not None:
                stats["kind"] = e.kind
            return {"id": path, "skip": f"bad sample: {e}"}


@dataclasses.dataclass(frozen=True)
class ImageBatchShape:
    batch_size: int
    size: int


def collate_images(examples: list[dict], shape: ImageBatchShape) -> dict:
    return {"images": np.stack([ex["image"] for ex in examples]).astype(np.float32)}


def folder_images(folders: Sequence[str]) -> list[str]:
    return [p for folder in folders for p in list_images(folder)]


def jbu_iterator(paths: Sequence[str], preparer: JBUImagePreparer, batch_size: int, *, seed: int,
                 num_workers: int = 0, process_index: int | None = None, process_count: int | None = None):
    """Endless shuffled batches {'arrays': {'images': (B, S, S, 3)}, 'meta': {...}} over the image files `paths`."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    ds = grain.MapDataset.source(paths).map_with_index(_with_index).map(preparer)
    ds = ds.shuffle(seed=seed).repeat(None)[process_index::process_count]
    ds = ds.map_with_index(_TagEpoch(max(1, len(paths) // process_count)))
    it_ds = SkipCountingBatch(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)),
                              ImageBatchShape(batch_size, preparer.size), collate_fn=collate_images)
    if num_workers > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2),
                                  worker_init_fn=exit_with_parent)
    return iter(it_ds)
