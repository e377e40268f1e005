"""Device mesh with axes (data, fsdp, tensor), built from config."""
from __future__ import annotations

import math
from typing import Mapping

import jax
from jax.sharding import AxisType

MESH_AXES = ("data", "fsdp", "tensor")


def make_mesh(shape: Mapping[str, int], devices=None) -> jax.sharding.Mesh:
    """`shape` maps each of data/fsdp/tensor to a size; one may be -1 (fill with the remaining devices)."""
    devices = list(devices if devices is not None else jax.devices())
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh axes {sorted(unknown)} are not among {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into a mesh with fixed axes of size {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
