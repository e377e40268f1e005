"""PyTorch `F.interpolate(mode='bicubic', align_corners=False)` as explicit weight matrices.

`jax.image.resize(method='cubic')` uses the Keys kernel with a=-0.5 and antialiases when shrinking, so it does not
reproduce the position-embedding interpolation of the PyTorch originals. Torch's rule (no antialias): the source
coordinate of output index o is (o + 0.5) * in / out - 0.5, taps at floor(src) - 1 .. floor(src) + 2 clamped to the
border, weights from the cubic convolution kernel with a = -0.75. Interpolation is separable, so a 2-D resize of a
(h_in, w_in) grid is `W_rows @ grid @ W_cols.T`.
"""
from __future__ import annotations

import functools

import numpy as np

TORCH_CUBIC_A = -0.75


def _cubic_near(x: np.ndarray, a: float) -> np.ndarray:  # |x| <= 1
    return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0


def _cubic_far(x: np.ndarray, a: float) -> np.ndarray:  # 1 < |x| < 2
    return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a


@functools.lru_cache(maxsize=256)
def torch_bicubic_matrix(in_size: int, out_size: int, a: float = TORCH_CUBIC_A) -> np.ndarray:
    """(out_size, in_size) float64 matrix M with `resize(x) = M @ x` along one axis, torch semantics."""
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"bicubic resize needs positive sizes, got {in_size} -> {out_size}")
    # Torch computes the scale in float32 for float32 inputs; the source coordinate therefore carries float32
    # rounding. Reproduce it so that taps near integer coordinates match.
    scale = np.float32(in_size) / np.float32(out_size)
    out = np.arange(out_size, dtype=np.float32)
    src = (out + np.float32(0.5)) * scale - np.float32(0.5)
    base = np.floor(src)
    t = (src - base).astype(np.float64)
    weights = np.stack([_cubic_far(t + 1.0, a), _cubic_near(t, a), _cubic_near(1.0 - t, a), _cubic_far(2.0 - t, a)], axis=1)
    matrix = np.zeros((out_size, in_size), np.float64)
    for tap in range(4):
        idx = np.clip(base.astype(np.int64) - 1 + tap, 0, in_size - 1)
        np.add.at(matrix, (np.arange(out_size), idx), weights[:, tap])
    matrix.setflags(write=False)
    return matrix


def reflect_index(i: np.ndarray, n: int) -> np.ndarray:
    """torch/numpy 'reflect' padding (edge not repeated) as indices into [0, n), for i in (-n, 2n - 1)."""
    i = np.abs(i)
    return np.where(i >= n, 2 * (n - 1) - i, i)


@functools.lru_cache(maxsize=1024)   # a function of sizes only; the packer asks for it for every view it packs
def resize_taps(in_hw: tuple[int, int], out_hw: tuple[int, int], taps: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Per output cell of an (out_h, out_w) torch-bicubic resize of an (in_h, in_w) map: flat source indices and
    weights, shapes (out_h * out_w, taps * taps), row-major over output cells; the flat index addresses the source
    in row-major order. Unused taps (clamped duplicates merged) carry weight 0. The arrays are shared: read-only."""
    per_axis = []
    for n_in, size in zip(in_hw, out_hw):
        m = torch_bicubic_matrix(n_in, size)
        idx = np.zeros((size, taps), np.int32)
        w = np.zeros((size, taps), np.float64)
        for o in range(size):
            nz = np.flatnonzero(m[o])
            idx[o, : len(nz)] = nz
            w[o, : len(nz)] = m[o, nz]
        per_axis.append((idx, w))
    (ri, rw), (ci, cw) = per_axis
    index = ri[:, None, :, None] * in_hw[1] + ci[None, :, None, :]  # (h, w, taps, taps)
    weight = rw[:, None, :, None] * cw[None, :, None, :]
    n = out_hw[0] * out_hw[1]
    index, weight = index.reshape(n, taps * taps).astype(np.int32), weight.reshape(n, taps * taps).astype(np.float32)
    index.setflags(write=False)
    weight.setflags(write=False)
    return index, weight


def position_taps(grid: int, out_hw: tuple[int, int], taps: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """`resize_taps` of a (grid, grid) position table: used to interpolate position embeddings of many differently
    sized images packed into one sequence."""
    return resize_taps((grid, grid), out_hw, taps)
