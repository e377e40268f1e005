"""LLaVA-UHD image modularization (spec uhd.md §1): cut an image into ~336^2-area slices plus an overview.

Exactly the slicer of v1-ECCV / v2 (`slice_image_minicpm`): float64 tie-breaking on |ln(W/H) - ln(cols/rows)| with
strict '<' (1024x1024 at M=7 gives (3, 2), by one ulp), one PIL-bicubic resize of the original image for all slices,
an overview that is never padded, and never more than `max_slices` slices. Sizes are PIL (width, height).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

COMMA, NEWLINE = ",", "\n"


@dataclasses.dataclass
class SlicedImage:
    overview: Image.Image            # the global view, ~scale_resolution^2 area, aspect ratio kept
    slices: list                     # row-major slices, all of one size
    grid: tuple[int, int] | None     # (cols, rows); None when the image is not split
    separators: list                 # ',' or '\n' after each slice ('\n' ends a row)

    @property
    def images(self) -> list:
        """What the vision tower sees, in order: the slices, then the overview LAST."""
        return [*self.slices, self.overview]


def floor_to_multiple(length: float, m: int) -> int:
    return max(int(length // m) * m, m)


def fit_area(width: float, height: float, scale_resolution: int = 336, patch_size: int = 14,
             upscale: bool = False) -> tuple[int, int]:
    """The size with area ~scale_resolution^2 and the same aspect ratio, sides multiples of the patch size."""
    if width * height > scale_resolution * scale_resolution or upscale:
        r = width / height
        height = int(scale_resolution / math.sqrt(r))
        width = int(height * r)
    return floor_to_multiple(width, patch_size), floor_to_multiple(height, patch_size)


def _slice_count(width: int, height: int, max_slices: int, scale_resolution: int) -> int:
    return min(math.ceil(width * height / (scale_resolution * scale_resolution)), max_slices)


def best_grid(width: int, height: int, max_slices: int = 7, scale_resolution: int = 336) -> tuple[int, int] | None:
    """(cols, rows) the slicer picks for a (width, height) image, or None when it is not split."""
    multiple = _slice_count(width, height, max_slices, scale_resolution)
    if multiple <= 1:
        return None
    log_ratio = math.log(width / height)
    best, best_err = (1, 1), math.inf
    for n in (multiple - 1, multiple, multiple + 1):
        if n == 1 or n > max_slices:
            continue
        for cols in range(1, n + 1):
            if n % cols:
                continue
            err = abs(log_ratio - math.log(cols / (n // cols)))
            if err < best_err:
                best, best_err = (cols, n // cols), err
    return best


def slice_image(image: Image.Image, max_slices: int = 7, scale_resolution: int = 336, patch_size: int = 14,
                never_split: bool = False) -> SlicedImage:
    width, height = image.size
    grid = None if never_split else best_grid(width, height, max_slices, scale_resolution)
    if grid is None:
        size = fit_area(width, height, scale_resolution, patch_size, upscale=True)
        return SlicedImage(image.resize(size, Image.Resampling.BICUBIC), [], None, [])
    overview = image.resize(fit_area(width, height, scale_resolution, patch_size), Image.Resampling.BICUBIC)
    cols, rows = grid
    cell_w = floor_to_multiple(width, cols) // cols
    cell_h = floor_to_multiple(height, rows) // rows
    sw, sh = fit_area(cell_w, cell_h, scale_resolution, patch_size, upscale=True)
    refined = image.resize((sw * cols, sh * rows), Image.Resampling.BICUBIC)
    slices = [refined.crop((x * sw, y * sh, (x + 1) * sw, (y + 1) * sh)) for y in range(rows) for x in range(cols)]
    separators = [COMMA if x < cols - 1 else NEWLINE for _ in range(rows) for x in range(cols)]
    return SlicedImage(overview, slices, grid, separators)


def resize_keep_ratio(image: Image.Image, long_side: int, upscale_only: bool = False) -> Image.Image:
    """Long side -> `long_side` (bicubic), the short side int(long_side / long * short) in exactly that order.

    `upscale_only` is v2-dec2024's rule: resize only if the new width exceeds the original width."""
    width, height = image.size
    if width > height:
        new = (long_side, int(long_side / width * height))
    else:
        new = (int(long_side / height * width), long_side)
    if upscale_only and new[0] <= width:
        return image
    return image.resize(new, Image.Resampling.BICUBIC)


def rescale_to_slices(image: Image.Image, n_slices: int = 6, scale_resolution: int = 336) -> Image.Image:
    """Training augmentation (`resize_as_grid`): rescale to an area of n_slices * scale_resolution^2."""
    width, height = image.size
    factor = math.sqrt(n_slices * scale_resolution ** 2 / (width * height))
    return image.resize((int(width * factor), int(height * factor)), Image.Resampling.BICUBIC)


@dataclasses.dataclass(frozen=True)
class SlicingOptions:
    """How training and evaluation pre-resize before slicing (spec §1.2)."""

    max_slices: int = 7
    scale_resolution: int = 336
    patch_size: int = 14
    never_split: bool = False         # pretraining uses only the overview: slices are computed then dropped
    overview_only: bool = False
    augment_prob: float = 0.0         # training: with this probability rescale to ~`augment_slices` slices
    augment_slices: int = 6
    pre_resize: int = 0               # eval: resize_keep_ratio to this long side first (0 = off)
    pre_resize_upscale_only: bool = False
    textvqa_long_side: int = 0        # training: images whose path names TextVQA get this long side (0 = off)


def modularize(image: Image.Image, options: SlicingOptions, path: str = "",
               rng: np.random.Generator | None = None) -> SlicedImage:
    """Pre-resize rules, then `slice_image`. `rng` drives the training augmentation (None: no augmentation)."""
    o = options
    if o.textvqa_long_side and "textvqa" in path.lower():
        image = resize_keep_ratio(image, o.textvqa_long_side, upscale_only=o.pre_resize_upscale_only)
    elif o.pre_resize:
        image = resize_keep_ratio(image, o.pre_resize, upscale_only=o.pre_resize_upscale_only)
    elif rng is not None and o.augment_prob > 0 and rng.random() < o.augment_prob:
        grid = best_grid(*image.size, o.max_slices, o.scale_resolution)
        if grid is None or grid[0] * grid[1] != o.augment_slices:
            image = rescale_to_slices(image, o.augment_slices, o.scale_resolution)
    sliced = slice_image(image, o.max_slices, o.scale_resolution, o.patch_size, o.never_split)
    if o.overview_only:
        return SlicedImage(sliced.overview, [], None, [])
    return sliced


# SliME's adaptive slicing (spec llava15_slime_llavar.md §C.1). Its own rules, not LLaVA-UHD's: the number of tiles
# comes from the area clamped to 2..6, the grid is chosen among factor pairs of n-1..n+1 tiles by LLaVA-NeXT's
# effective-resolution rule, and the image is letterboxed onto a black canvas of whole tiles.
SLIME_MIN_TILES, SLIME_MAX_TILES = 2, 6


def slime_grid_candidates(width: int, height: int, tile: int = 336) -> list[tuple[int, int]]:
    """(cols, rows) candidates in the original's order: m ascending, then cols = 1..m."""
    n = math.ceil(width * height / (tile * tile))
    n = min(max(n, SLIME_MIN_TILES), SLIME_MAX_TILES)
    counts = (n, n + 1) if n <= 2 else (n - 1, n, n + 1)
    return [(i, m // i) for m in counts for i in range(1, m + 1) if m % i == 0]


def slime_grid(width: int, height: int, tile: int = 336) -> tuple[int, int]:
    """The candidate keeping the most of the image's resolution, then wasting the least canvas; first on ties."""
    best, best_eff, best_waste = None, -1, math.inf
    for cols, rows in slime_grid_candidates(width, height, tile):
        cw, ch = cols * tile, rows * tile
        s = min(cw / width, ch / height)
        effective = min(int(width * s) * int(height * s), width * height)
        waste = cw * ch - effective
        if effective > best_eff or (effective == best_eff and waste < best_waste):
            best, best_eff, best_waste = (cols, rows), effective, waste
    return best


def letterbox(image: Image.Image, width: int, height: int) -> Image.Image:
    """Aspect-preserving PIL-bicubic resize (the constrained side exact, the other ceil'd) pasted centred on black."""
    w, h = image.size
    if width / w < height / h:
        new_w, new_h = width, min(math.ceil(h * width / w), height)
    else:
        new_w, new_h = min(math.ceil(w * height / h), width), height
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    canvas.paste(image.resize((new_w, new_h), Image.Resampling.BICUBIC), ((width - new_w) // 2, (height - new_h) // 2))
    return canvas


def slime_global_view(image: Image.Image, tile: int = 336) -> Image.Image:
    """SliME's global view: a plain tile x tile resize, aspect distorted (not padded)."""
    return image.resize((tile, tile), Image.Resampling.BICUBIC)


def slime_tiles(image: Image.Image, tile: int = 336) -> tuple[Image.Image, list, tuple[int, int]]:
    """-> (global view (`slime_global_view`); tiles row-major; (cols, rows))."""
    cols, rows = slime_grid(*image.size, tile=tile)
    canvas = letterbox(image, cols * tile, rows * tile)
    tiles = [canvas.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
             for r in range(rows) for c in range(cols)]
    return slime_global_view(image, tile), tiles, (cols, rows)
