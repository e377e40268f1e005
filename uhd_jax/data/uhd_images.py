"""Host side of the UHD image path: slice each image, normalise every slice and overview at its own size, pack them
into a row of the vision tower's fixed patch budget, and build the resampler's geometry for that row.

Budget rule (`data.patch_budget`, N slots per sample): each image takes 1 (CLS) + h*w slots, the images of a sample
sit back to back in its row. The default, (max_slices + 1) * (1 + (336/14)^2) per image of the sample, holds every
image the slicer makes from ordinary shapes (slices and overviews have at most 576 patches); degenerate shapes (a
14-pixel-high 9996-pixel-wide overview has 714 patches) may not fit: such a sample is skipped and counted with its
size and the budget in the reason, never truncated. With one compiled shape per run, any mix of aspect ratios
compiles the step once.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from uhd_jax.data.image_processing import normalize  # CLIP processor with do_resize/do_center_crop off
from uhd_jax.data.slicing import SlicedImage, SlicingOptions, modularize
from uhd_jax.models.interpolate import position_taps
from uhd_jax.models.projectors.windows import MAX_KEYS, roi_taps

GEOMETRY_KEYS = ("patches", "patch_segment_ids", "patch_is_cls", "patch_pos_index", "patch_pos_weight",
                 "key_pos_index", "key_pos_weight", "roi_index", "roi_weight", "key_valid", "image_valid")


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """Static shapes of the packed image inputs of one sample row."""

    patch_budget: int                # N token slots of the vision tower per sample
    max_images: int                  # I image slots per sample (slices + overviews of all its images)
    patch_size: int = 14
    vit_grid: int = 24               # the vision tower's native position grid
    query_grid: int = 12             # the resampler's grid (12: ECCV windows; 8: arXiv full attention)
    windowed: bool = True
    roi_taps: int = 16
    box_dtype: str | None = None     # round window boxes to this dtype first ('bfloat16' like bf16 training)

    def zeros(self, batch: int) -> dict:
        b, n, i, p, q = batch, self.patch_budget, self.max_images, self.patch_size, self.query_grid ** 2
        t = self.roi_taps if self.windowed else 1
        return {
            "patches": np.zeros((b, n, p, p, 3), np.float32), "patch_segment_ids": np.zeros((b, n), np.int32),
            "patch_is_cls": np.zeros((b, n), bool), "patch_pos_index": np.zeros((b, n, 16), np.int32),
            "patch_pos_weight": np.zeros((b, n, 16), np.float32), "key_pos_index": np.zeros((b, n, 16), np.int32),
            "key_pos_weight": np.zeros((b, n, 16), np.float32),
            "roi_index": np.zeros((b, i, q if self.windowed else 1, MAX_KEYS, t), np.int32),
            "roi_weight": np.zeros((b, i, q if self.windowed else 1, MAX_KEYS, t), np.float32),
            "key_valid": np.zeros((b, i, MAX_KEYS), bool), "image_valid": np.zeros((b, i), bool),
        }


def patches_needed(images: list[np.ndarray], patch: int) -> int:
    return sum(1 + (a.shape[0] // patch) * (a.shape[1] // patch) for a in images)


def fill_row(out: dict, row: int, images: list[np.ndarray], layout: PackedLayout) -> None:
    """Write one sample's normalised images (H, W, 3), in order, into row `row` of the arrays of `layout.zeros`."""
    p = layout.patch_size
    if len(images) > layout.max_images:
        raise ValueError(f"{len(images)} images (slices + overviews) exceed data.max_slice_images="
                         f"{layout.max_images}")
    need = patches_needed(images, p)
    if need > layout.patch_budget:
        sizes = ", ".join(f"{a.shape[1]}x{a.shape[0]}" for a in images)
        raise ValueError(f"images need {need} vision-token slots, more than data.patch_budget={layout.patch_budget} "
                         f"(sizes {sizes}); raise the budget or pre-resize such images")
    offset = 0
    for k, img in enumerate(images):
        hh, ww = img.shape[:2]
        if hh % p or ww % p:
            raise ValueError(f"image {k}: size {ww}x{hh} is not a multiple of the patch size {p}")
        h, w = hh // p, ww // p
        cells = slice(offset + 1, offset + 1 + h * w)
        out["patch_segment_ids"][row, offset:cells.stop] = k + 1
        out["patch_is_cls"][row, offset] = True
        out["patches"][row, cells] = img.reshape(h, p, w, p, 3).transpose(0, 2, 1, 3, 4).reshape(h * w, p, p, 3)
        out["patch_pos_index"][row, cells], out["patch_pos_weight"][row, cells] = position_taps(layout.vit_grid,
                                                                                                (h, w))
        out["key_pos_index"][row, cells], out["key_pos_weight"][row, cells] = position_taps(layout.query_grid,
                                                                                            (h, w))
        if layout.windowed:
            index, weight, key_valid, _ = roi_taps(h, w, layout.query_grid, layout.roi_taps, layout.box_dtype)
            out["roi_index"][row, k] = index + cells.start
            out["roi_weight"][row, k] = weight
            out["key_valid"][row, k] = key_valid
        out["image_valid"][row, k] = True
        offset = cells.stop


def sliced_images(image: Image.Image, options: SlicingOptions, path: str = "",
                  rng: np.random.Generator | None = None) -> tuple[SlicedImage, list[np.ndarray]]:
    sliced = modularize(image, options, path, rng)
    return sliced, [normalize(im) for im in sliced.images]
