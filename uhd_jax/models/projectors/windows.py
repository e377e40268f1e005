"""Host-side window geometry of the UHD resamplers (spec uhd.md §2.2): 12x12 windows over a feature map, the pooled
size chosen from its aspect ratio, and torchvision `roi_align` (aligned=False, sampling_ratio=-1) as sparse taps.

RoIAlign is linear in the feature map and, for axis-aligned boxes, separable: a sample's bilinear weight is a row
weight times a column weight, its "outside the map contributes 0" rule is a row test AND a column test, and the bin
average is a mean over rows times a mean over columns. So each output key of window t and bin (r, c) is a weighted
sum of at most T feature pixels, computed here once per map size, with torchvision's float32 sample positions on
the original's boxes. The device then does gathers and a weighted sum (no Python loop over windows in jit).
"""
from __future__ import annotations

import functools
import math

import numpy as np

# (cols, rows) candidates in the original's order; the first with the smallest |ln(w/h) - ln(cols/rows)| wins.
POOLED_CANDIDATES = ((4, 2), (3, 2), (4, 3), (3, 3), (2, 4), (2, 3), (3, 4))
MAX_KEYS = max(c * r for c, r in POOLED_CANDIDATES)  # 12


def pooled_size(h: int, w: int) -> tuple[int, int]:
    """(rows, cols) of the RoIAlign output for an h x w feature map."""
    log_a = math.log(w / h)
    best, best_err = (3, 3), math.inf
    for cols, rows in POOLED_CANDIDATES:
        err = abs(log_a - math.log(cols / rows))
        if err < best_err:
            best, best_err = (cols, rows), err
    return best[1], best[0]


def _round_to(x: np.ndarray, box_dtype: str | None) -> np.ndarray:
    # float32 first even when x is float64: the original rounds its float32 box tensor to the compute dtype
    # (`region_boxes.to(dtype)`), and a direct float64 -> bf16 rounding differs from that double rounding on ties.
    x = np.asarray(x).astype(np.float32)
    if box_dtype is None or box_dtype in ("", "float32"):
        return x
    if box_dtype == "bfloat16":
        import ml_dtypes

        return x.astype(ml_dtypes.bfloat16).astype(np.float32)
    return x.astype(np.dtype(box_dtype)).astype(np.float32)


def window_edges(h: int, w: int, grid: int = 12, box_dtype: str | None = None):
    """(row starts, row ends, column starts, column ends) of the grid x grid windows over an h x w map, as float32
    (optionally rounded to the compute dtype as the original does before calling roi_align).

    The original (`slice_process.py::slice_image_feature_minicpm` / `generate_subimage_coordinates`) works in Python
    floats: the window size is sqrt((h*w/grid^2) / (w/h)) and that times w/h (h/grid and w/grid up to the last
    float64 bit), start = i * size, end = start + size, and only the finished boxes become one float32 tensor.
    Float32 arithmetic instead lands ends one float32 step below the map's edge (9.999999 for a 10-row map), where
    a RoIAlign sample then reads the last row instead of counting as outside."""
    crop_h = math.sqrt(h * w / (grid * grid) / (w / h))
    crop_w = crop_h * (w / h)
    ys = [i * crop_h for i in range(grid)]
    xs = [j * crop_w for j in range(grid)]
    edges = (ys, [y + crop_h for y in ys], xs, [x + crop_w for x in xs])
    return tuple(_round_to(np.array(e, np.float64), box_dtype) for e in edges)


def axis_weights(start: np.float32, end: np.float32, pooled: int, length: int) -> np.ndarray:
    """(pooled, length) RoIAlign weights along one axis for one window: mean over the bin's samples of the
    bilinear weights, zero for samples outside [-1, length]."""
    f32 = np.float32
    roi = max(f32(end - start), f32(1.0))
    bin_size = f32(roi / f32(pooled))
    n = int(math.ceil(roi / pooled))
    out = np.zeros((pooled, length), np.float64)
    for p in range(pooled):
        base = f32(start + f32(f32(p) * bin_size))
        for i in range(n):
            y = f32(base + f32(f32(f32(i + 0.5) * bin_size) / f32(n)))
            if y < -1.0 or y > length:
                continue
            y = max(y, f32(0.0))
            low = int(y)
            if low >= length - 1:
                out[p, length - 1] += 1.0
                continue
            frac = f32(y - f32(low))
            out[p, low] += f32(1.0) - frac
            out[p, low + 1] += frac
        out[p] /= n
    return out


@functools.lru_cache(maxsize=4096)
def roi_taps(h: int, w: int, grid: int = 12, max_taps: int = 16, box_dtype: str | None = None):
    """Taps of every key of an h x w map: (index, weight) of shape (grid*grid, MAX_KEYS, max_taps) into the
    row-major flattened map, `key_valid` (MAX_KEYS,) and the pooled (rows, cols).

    Raises ValueError if a key needs more than `max_taps` pixels (raise data.roi_taps for such shapes)."""
    ph, pw = pooled_size(h, w)
    y0, y1, x0, x1 = window_edges(h, w, grid, box_dtype)
    wy = [axis_weights(y0[i], y1[i], ph, h) for i in range(grid)]
    wx = [axis_weights(x0[j], x1[j], pw, w) for j in range(grid)]
    index = np.zeros((grid * grid, MAX_KEYS, max_taps), np.int32)
    weight = np.zeros((grid * grid, MAX_KEYS, max_taps), np.float32)
    for i in range(grid):
        for j in range(grid):
            for r in range(ph):
                rows = np.flatnonzero(wy[i][r])
                for c in range(pw):
                    cols = np.flatnonzero(wx[j][c])
                    k = len(rows) * len(cols)
                    if k > max_taps:
                        raise ValueError(f"a {h}x{w} feature map needs {k} RoIAlign taps per key, more than "
                                         f"max_taps={max_taps}")
                    idx = (rows[:, None] * w + cols[None, :]).reshape(-1)
                    wt = (wy[i][r][rows][:, None] * wx[j][c][cols][None, :]).reshape(-1)
                    index[i * grid + j, r * pw + c, :k] = idx
                    weight[i * grid + j, r * pw + c, :k] = wt
    key_valid = np.arange(MAX_KEYS) < ph * pw
    return index, weight, key_valid, (ph, pw)
