"""Train state and its shardings: parameters from the logical rules, optimizer moments mirroring their parameter."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
from jax.sharding import NamedSharding, PartitionSpec as P



@flax.struct.dataclass
class TrainState:
    step: Any        # () int32: applied updates
    params: Any      # every parameter, trainable or frozen
    opt_state: Any   # optax state over the trainable parameters only


def _names(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def opt_state_shardings(abstract_opt_state, param_shardings, mesh) -> Any:
    """Each optimizer leaf takes the sharding of the parameter whose path ends its own path (Adam's mu/nu mirror the
    parameter tree inside optax's state); scalars such as step counts are replicated."""
    by_path = {}
    jax.tree_util.tree_map_with_path(lambda p, s: by_path.__setitem__(_names(p), s), param_shardings)
    replicated = NamedSharding(mesh, P())

    def one(path, leaf):
        names = _names(path)
        for start in range(len(names)):
            hit = by_path.get(names[start:])
            if hit is not None and len(hit.spec) <= len(leaf.shape):
                return hit
        return replicated
    return jax.tree_util.tree_map_with_path(one, abstract_opt_state)
