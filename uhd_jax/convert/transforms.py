"""Tensor layout transforms between a torch state dict entry and our parameter.

Each transform knows, from our parameter's shape, the torch shape it expects (so a mis-shaped tensor is reported
before any reshaping), and converts both ways. Arrays are numpy.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Identity:
    name: str = "identity"

    def torch_shape(self, ours: tuple) -> tuple:
        return tuple(ours)

    def to_ours(self, t: np.ndarray, ours: tuple) -> np.ndarray:
        return t

    def to_torch(self, a: np.ndarray) -> np.ndarray:
        return a


@dataclasses.dataclass(frozen=True)
class Flatten:
    """torch keeps a flat vector (e.g. a q bias of heads*head_dim), we keep (heads, head_dim)."""

    name: str = "flatten"

    def torch_shape(self, ours: tuple) -> tuple:
        return (math.prod(ours),)

    def to_ours(self, t, ours):
        return t.reshape(ours)

    def to_torch(self, a):
        return a.reshape(-1)


@dataclasses.dataclass(frozen=True)
class Linear:
    """torch Linear weight (out, in) <-> our DenseGeneral kernel (*in_dims, *out_dims); `n_in` = len(in_dims).

    Row-major flattening of (heads, head_dim) equals torch's head-major packing of heads * head_dim.
    """

    n_in: int = 1
    name: str = "linear"

    def torch_shape(self, ours):
        return (math.prod(ours[self.n_in:]), math.prod(ours[:self.n_in]))

    def to_ours(self, t, ours):
        return np.ascontiguousarray(t.T).reshape(ours)

    def to_torch(self, a):
        n_in = math.prod(a.shape[:self.n_in])
        return np.ascontiguousarray(a.reshape(n_in, -1).T)


@dataclasses.dataclass(frozen=True)
class PatchConv:
    """torch Conv2d weight (D, C, p, p) <-> our patch kernel (p, p, C, D) applied to (p, p, C) patches."""

    name: str = "patch_conv"

    def torch_shape(self, ours):
        p, q, c, d = ours
        return (d, c, p, q)

    def to_ours(self, t, ours):
        return np.ascontiguousarray(t.transpose(2, 3, 1, 0))

    def to_torch(self, a):
        return np.ascontiguousarray(a.transpose(3, 2, 0, 1))


@dataclasses.dataclass(frozen=True)
class Conv1x1:
    """torch Conv2d 1x1 weight (out, in, 1, 1) <-> our dense kernel (in, out) over channels-last maps."""

    name: str = "conv1x1"

    def torch_shape(self, ours):
        return (ours[1], ours[0], 1, 1)

    def to_ours(self, t, ours):
        return np.ascontiguousarray(t[:, :, 0, 0].T)

    def to_torch(self, a):
        return np.ascontiguousarray(a.T[:, :, None, None])


IDENTITY = Identity()
FLATTEN = Flatten()
LINEAR = Linear(1)
LINEAR_FROM_HEADS = Linear(2)  # output projections whose input is (heads, head_dim)
PATCH_CONV = PatchConv()
CONV1X1 = Conv1x1()
