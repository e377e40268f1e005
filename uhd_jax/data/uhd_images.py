"""Host side of the UHD image path: slice each image, normalise every slice and overview at its own size, pack them
into a row of the vision tower's fixed patch budget, and build the resampler's geometry for that row.

Budget rule (`data.patch_budget`, N slots per sample): each image takes 1 (CLS) + h*w slots, the images of a sample
sit back to back in its row. The default, (max_slices + 1) * (1 + (336/14)^2) per image of the sample, holds every
image the slicer makes. One image may have at most the vision tower's `max_image_patches` patches (default its
native grid^2 = 576: the slicer makes more only from images of aspect ratio above ~576:1, e.g. a 14-pixel-high
9996-pixel-wide overview of 714 patches), because the tower's attention gives each image a row of that many keys.
A sample over either limit is skipped and counted with its sizes and the limit in the reason, never truncated. With
one compiled shape per run, any mix of aspect ratios compiles the step once.

Inference may pack a batch into a smaller budget: `budget_buckets` are eighths of the full one (for the default,
1..8 images of 577 slots), and a batch takes the smallest that holds its rows (`bucketed`, or `fit_to_bucket` for
arrays already packed at the full budget). The tower's per-token layers run on every slot, padding included, so a
672x1088 image (3859 slots) counts 1.21x its per-image FLOPs at 4616 slots and 1.07x at 4039; a run compiles once
per bucket it touches, at most `count` times. Padding slots are read by nothing, so outputs do not change.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import numpy as np
from PIL import Image

from uhd_jax.data.image_processing import normalize  # CLIP processor with do_resize/do_center_crop off
from uhd_jax.data.slicing import SlicedImage, SlicingOptions, modularize
from uhd_jax.models.interpolate import position_taps, reflect_index, resize_taps
from uhd_jax.models.projectors.jbu import DIAMETER, RADIUS, pool_windows
from uhd_jax.models.projectors.windows import MAX_KEYS, roi_taps

JBU_LEVELS = (2, 4)  # the inverse pyramid's upsampled levels, each from the previous (1x -> 2x -> 4x)


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
    jbu: bool = False                # v2: also the 2x and 4x levels (JBU gathers, pooled guidance, windows)
    jbu_top: int = 4                 # the highest level built: 2 for a model that keeps no 4x level (saves 16x rows)
    level_roi_taps: int = 36
    image_patches: int = 0           # most patches of one image (0: vit_grid^2), `ViTConfig.max_image_patches`

    @property
    def max_image_patches(self) -> int:
        return self.image_patches or self.vit_grid ** 2

    @property
    def levels(self) -> tuple[int, ...]:
        """The JBU levels this layout holds arrays for."""
        return tuple(lv for lv in JBU_LEVELS if self.jbu and lv <= self.jbu_top)

    def level_budget(self, level: int) -> int:
        return level * level * self.patch_budget

    def zeros(self, batch: int) -> dict:
        b, n, i, p, q = batch, self.patch_budget, self.max_images, self.patch_size, self.query_grid ** 2
        t = self.roi_taps if self.windowed else 1
        levels = {}
        for lv in self.levels:
            m = self.level_budget(lv)
            levels.update({
                f"l{lv}_src_index": np.zeros((b, m, 16), np.int32), f"l{lv}_src_weight": np.zeros((b, m, 16), np.float32),
                f"l{lv}_nbr_index": np.zeros((b, m, DIAMETER ** 2), np.int32),
                f"l{lv}_guidance": np.zeros((b, m, 3), np.float32),
                f"l{lv}_key_pos_index": np.zeros((b, m, 16), np.int32),
                f"l{lv}_key_pos_weight": np.zeros((b, m, 16), np.float32),
                f"l{lv}_roi_index": np.zeros((b, i, q, MAX_KEYS, self.level_roi_taps), np.int32),
                f"l{lv}_roi_weight": np.zeros((b, i, q, MAX_KEYS, self.level_roi_taps), np.float32)})
        return levels | {
            "patches": np.zeros((b, n, p, p, 3), np.float32), "patch_segment_ids": np.zeros((b, n), np.int32),
            "patch_is_cls": np.zeros((b, n), bool), "patch_pos_index": np.zeros((b, n, 16), np.int32),
            "patch_pos_weight": np.zeros((b, n, 16), np.float32), "key_pos_index": np.zeros((b, n, 16), np.int32),
            "key_pos_weight": np.zeros((b, n, 16), np.float32),
            "roi_index": np.zeros((b, i, q if self.windowed else 1, MAX_KEYS, t), np.int32),
            "roi_weight": np.zeros((b, i, q if self.windowed else 1, MAX_KEYS, t), np.float32),
            "key_valid": np.zeros((b, i, MAX_KEYS), bool), "image_valid": np.zeros((b, i), bool),
        }


def layout_for_model(cfg, *, patch_budget: int, max_images: int, roi_taps: int = 16, level_roi_taps: int = 36,
                     box_dtype: str | None = None) -> PackedLayout:
    """The packed layout a UHD `VLMConfig` reads: its vision tower's patch/grid and its projector's windows."""
    from uhd_jax.models.projectors import RESAMPLER_TYPES
    from uhd_jax.models.projectors.hiwin import top_jbu_level

    spec = RESAMPLER_TYPES[cfg.projector_type]
    return PackedLayout(patch_budget=patch_budget, max_images=max_images, patch_size=cfg.vision.patch_size,
                        vit_grid=cfg.vision.grid, query_grid=spec["grid"], windowed=spec["windowed"],
                        roi_taps=roi_taps, jbu=spec.get("jbu", False), level_roi_taps=level_roi_taps,
                        jbu_top=top_jbu_level(cfg.feature_scale_mask) if spec.get("jbu") else 4,
                        box_dtype=box_dtype, image_patches=cfg.vision.max_image_patches)


# The packed arrays with one entry per token slot (axis 1), and those of each JBU level's slots.
SLOT_KEYS = ("patches", "patch_segment_ids", "patch_is_cls", "patch_pos_index", "patch_pos_weight", "key_pos_index",
             "key_pos_weight")
LEVEL_SLOT_KEYS = ("src_index", "src_weight", "nbr_index", "guidance", "key_pos_index", "key_pos_weight")


def budget_buckets(full: int, count: int = 8) -> tuple[int, ...]:
    """The static budgets a batch may use: ceil(k/count) of the full budget, k = 1..count (count <= 1: the full
    budget only)."""
    count = max(int(count), 1)
    return tuple(sorted({max(-(-full * k // count), 1) for k in range(1, count + 1)}))


def bucket_budget(need: int, full: int, count: int = 8) -> int:
    """The smallest bucket holding `need` slots (the full budget when none does: `check_images` names the excess)."""
    return next((b for b in budget_buckets(full, count) if b >= need), full)


def bucketed(layout: PackedLayout, need: int, count: int = 8) -> PackedLayout:
    """`layout` with the smallest bucket budget holding `need` slots (the JBU levels shrink with it)."""
    return dataclasses.replace(layout, patch_budget=bucket_budget(need, layout.patch_budget, count))


def slots_used(segment_ids: np.ndarray) -> int:
    """The most slots any packed row fills (images sit back to back from slot 0)."""
    seg = np.asarray(segment_ids)
    return int((seg > 0).sum(axis=-1).max()) if seg.size else 0


def fit_to_bucket(arrays: dict, layout: PackedLayout, count: int = 8) -> tuple[dict, PackedLayout]:
    """Arrays packed at `layout` (batch axis first) cut to the smallest bucket that holds their rows: the slots past
    it are padding that no index points into, so the cut changes no output."""
    small = bucketed(layout, slots_used(arrays["patch_segment_ids"]), count)
    cuts = {key: small.patch_budget for key in SLOT_KEYS}
    cuts.update({f"l{lv}_{key}": small.level_budget(lv) for lv in layout.levels for key in LEVEL_SLOT_KEYS})
    return {k: (v[:, :cuts[k]] if k in cuts else v) for k, v in arrays.items()}, small


def patches_needed(images: list[np.ndarray], patch: int) -> int:
    return sum(1 + (a.shape[0] // patch) * (a.shape[1] // patch) for a in images)


def check_images(images: list[np.ndarray], layout: PackedLayout) -> None:
    """Raise ValueError (naming sizes and the setting to change) if a sample's images cannot be packed: count,
    patch multiples, budget, RoIAlign tap caps, the JBU's minimum level size, and patches per image. `fill_row`
    checks the same, so a sample that passed here (in the data workers, as a counted skip) never fails at
    collation."""
    p = layout.patch_size
    if len(images) > layout.max_images:
        raise ValueError(f"{len(images)} images (slices + overviews) exceed data.max_slice_images="
                         f"{layout.max_images}")
    for k, img in enumerate(images):
        if img.shape[0] % p or img.shape[1] % p:
            raise ValueError(f"image {k}: size {img.shape[1]}x{img.shape[0]} is not a multiple of the patch size {p}")
    need = patches_needed(images, p)
    if need > layout.patch_budget:
        sizes = ", ".join(f"{a.shape[1]}x{a.shape[0]}" for a in images)
        raise ValueError(f"images need {need} vision-token slots, more than data.patch_budget={layout.patch_budget} "
                         f"(sizes {sizes}); raise the budget or pre-resize such images")
    for k, img in enumerate(images):
        h, w = img.shape[0] // p, img.shape[1] // p
        if layout.windowed:
            roi_taps(h, w, layout.query_grid, layout.roi_taps, layout.box_dtype)
        for lv in layout.levels:
            if min(lv * h, lv * w) <= RADIUS:
                raise ValueError(f"image {k} of {w}x{h} patches: its {lv}x map is too small for the JBU's reflect "
                                 f"padding by {RADIUS} (needs more than {RADIUS} pixels per side)")
            roi_taps(lv * h, lv * w, layout.query_grid, layout.level_roi_taps, layout.box_dtype)
    for k, img in enumerate(images):
        n = (img.shape[0] // p) * (img.shape[1] // p)
        if n > layout.max_image_patches:
            raise ValueError(f"image {k}: {img.shape[1]}x{img.shape[0]} has {n} patches, more than the vision "
                             f"tower's {layout.max_image_patches} per image (model.vision.max_image_patches); "
                             f"pre-resize such images")


def fill_row(out: dict, row: int, images: list[np.ndarray], layout: PackedLayout) -> None:
    """Write one sample's normalised images (H, W, 3), in order, into row `row` of the arrays of `layout.zeros`."""
    p = layout.patch_size
    check_images(images, layout)
    offset = 0
    level_offsets = {lv: 0 for lv in layout.levels}
    for k, img in enumerate(images):
        h, w = img.shape[0] // p, img.shape[1] // p
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
        if layout.jbu:
            fill_levels(out, row, k, img, (h, w), cells.start, level_offsets, layout)
        offset = cells.stop


def fill_levels(out: dict, row: int, k: int, img: np.ndarray, hw: tuple[int, int], first_patch: int,
                offsets: dict, layout: PackedLayout) -> None:
    """The 2x and (where the layout holds it) 4x maps of image k: bicubic taps into the previous level's row, the 7x7
    reflect neighbourhood, the guidance image pooled to the level (torch adaptive_avg_pool), key positions and RoIAlign
    windows."""
    h, w = hw
    src_offset, src_hw = first_patch, (h, w)
    for lv in layout.levels:
        lh, lw = lv * h, lv * w
        start = offsets[lv]
        cells = slice(start, start + lh * lw)  # fits: level budgets are lv^2 x the patch budget
        t = level_tables(src_hw, (lh, lw), layout.query_grid, layout.level_roi_taps, layout.box_dtype)
        out[f"l{lv}_src_index"][row, cells] = t.src_index + src_offset
        out[f"l{lv}_src_weight"][row, cells] = t.src_weight
        out[f"l{lv}_nbr_index"][row, cells] = t.nbr_index + start
        pooled = area_pool(area_pool(img, lh, axis=0), lw, axis=1)
        out[f"l{lv}_guidance"][row, cells] = pooled.reshape(-1, 3).astype(np.float32)
        out[f"l{lv}_key_pos_index"][row, cells], out[f"l{lv}_key_pos_weight"][row, cells] = t.pos_index, t.pos_weight
        out[f"l{lv}_roi_index"][row, k] = t.roi_index + start
        out[f"l{lv}_roi_weight"][row, k] = t.roi_weight
        offsets[lv] = cells.stop
        src_offset, src_hw = start, (lh, lw)


def area_pool(x: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """torch's adaptive_avg_pool along one axis (the windows of `jbu.pool_windows`), summed in float64. Windows that
    tile the axis are summed in one pass, overlapping ones (n / out not whole) as differences of a running sum. Not
    a BLAS product: the data path's small multithreaded GEMMs fought the train step's threads for the same cores
    and made batch preparation 4x slower."""
    start, end, tiled = pool_windows(x.shape[axis], out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    count = (end - start).astype(np.float64)
    if tiled:
        return np.add.reduceat(x, start, axis=axis, dtype=np.float64) / count.reshape(shape)
    csum = np.cumsum(x, axis=axis, dtype=np.float64)
    csum = np.concatenate([np.zeros_like(np.take(csum, [0], axis=axis)), csum], axis=axis)
    return (np.take(csum, end, axis=axis) - np.take(csum, start, axis=axis)) / count.reshape(shape)


class LevelTables(NamedTuple):
    src_index: np.ndarray    # (lh * lw, 16) bicubic taps into the previous level (row-local)
    src_weight: np.ndarray
    nbr_index: np.ndarray    # (lh * lw, 49) the 7x7 reflect neighbourhood (level-local)
    pos_index: np.ndarray    # (lh * lw, 16) bicubic taps into the query_grid^2 position table
    pos_weight: np.ndarray
    roi_index: np.ndarray    # (Q, MAX_KEYS, taps) RoIAlign taps (level-local)
    roi_weight: np.ndarray


@functools.lru_cache(maxsize=1024)
def level_tables(src_hw: tuple[int, int], level_hw: tuple[int, int], query_grid: int, roi_taps_: int,
                 box_dtype) -> LevelTables:
    """The geometry of one pyramid level that depends only on sizes: cached (slice sizes repeat across a dataset)."""
    lh, lw = level_hw
    src_index, src_weight = resize_taps(src_hw, level_hw)
    yy, xx = np.meshgrid(np.arange(lh), np.arange(lw), indexing="ij")
    d = np.arange(-RADIUS, RADIUS + 1)
    ny = reflect_index(yy[..., None, None] + d[:, None], lh)
    nx = reflect_index(xx[..., None, None] + d[None, :], lw)
    pos_index, pos_weight = position_taps(query_grid, level_hw)
    roi_index, roi_weight, _, _ = roi_taps(lh, lw, query_grid, roi_taps_, box_dtype)
    tables = LevelTables(src_index, src_weight, (ny * lw + nx).reshape(lh * lw, -1), pos_index, pos_weight,
                         roi_index, roi_weight)
    for a in tables:
        a.setflags(write=False)
    return tables


def sliced_images(image: Image.Image, options: SlicingOptions, path: str = "",
                  rng: np.random.Generator | None = None) -> tuple[SlicedImage, list[np.ndarray]]:
    sliced = modularize(image, options, path, rng)
    return sliced, [normalize(im) for im in sliced.images]
