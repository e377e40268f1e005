"""Logical axis names -> mesh shardings, abstract (never unsharded) initialisation, and batch placement.

The model code names axes (`embed`, `mlp`, `heads`, ...); the rules below, overridable from config, say which mesh
axis each name is split over. A dimension that a mesh axis does not divide is replicated instead of failing, so the
same rules serve every model size (e.g. 4 KV heads on a tensor axis of 8).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

# FSDP shards the model dimension of every weight; tensor parallelism splits heads, MLP and vocabulary.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("norm", None),
    ("layers", None),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", "tensor"),
)

BATCH_AXES = ("data", "fsdp")


def rules_from_config(rules) -> tuple[tuple[str, Any], ...]:
    """Config stores rules as a list of [name, mesh_axis | list | None]; normalise to the tuple form flax wants."""
    if rules is None:
        return DEFAULT_RULES
    out = []
    for name, target in rules:
        out.append((name, tuple(target) if isinstance(target, (list, tuple)) else target))
    return tuple(out)


def _fit_spec(spec: P, shape: Sequence[int], mesh: jax.sharding.Mesh) -> P:
    """Drop mesh axes that do not divide their dimension (replicate that dimension instead)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        kept, size = [], 1
        for name in names:
            if dim % (size * mesh.shape[name]) == 0:
                kept.append(name)
                size *= mesh.shape[name]
        fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*fitted)


def logical_shardings(abstract_tree, mesh: jax.sharding.Mesh, rules) -> Any:
    """A plain tree of NamedShardings for a tree of `nn.LogicallyPartitioned` (boxed) or plain (replicated) leaves."""
    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            spec = nn.logical_to_mesh_axes(leaf.names, rules)
            return NamedSharding(mesh, _fit_spec(spec, leaf.value.shape, mesh))
        return NamedSharding(mesh, P())
    return jax.tree_util.tree_map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def abstract_params(init_fn: Callable[..., Any], *args):
    """Shapes, dtypes and logical names of `init_fn(*args)` without allocating anything."""
    return jax.eval_shape(init_fn, *args)


def init_sharded(init_fn: Callable[..., Any], mesh: jax.sharding.Mesh, rules, *args):
    """Run `init_fn(*args)` (returning boxed variables) as one jit whose outputs land sharded: no unsharded copy.

    Returns (params as a plain pytree, the matching NamedSharding tree).
    """
    shardings = logical_shardings(abstract_params(init_fn, *args), mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        params = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return params, shardings


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(batch, mesh: jax.sharding.Mesh):
    """Place this process's slice of a host batch onto the mesh, split over (data, fsdp) along dimension 0.

    Uses `make_array_from_process_local_data`, so each host passes only its own rows and the code is multi-host.
    """
    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
    return jax.tree_util.tree_map(one, batch)
