"""Parameter checkpoints: an Orbax tree under `params/` plus `config.json` (the model config and provenance).

Orbax commits a checkpoint by writing into a temporary directory and renaming it, so an interrupted save never
replaces the previous good one. Loading restores straight into the requested shardings.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def save_params(directory: str, params: Any, meta: dict) -> None:
    """Write `params` (numpy or jax arrays) and `meta` (must hold 'model', the `config.model` dict)."""
    directory = os.path.abspath(directory)
    if "model" not in meta:
        raise ValueError("checkpoint metadata needs a 'model' entry (the config.model dict)")
    os.makedirs(directory, exist_ok=True)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(directory, PARAMS_DIR), params, force=True)
    ckpt.wait_until_finished()
    tmp = os.path.join(directory, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, os.path.join(directory, CONFIG_FILE))


def load_meta(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} is not a uhd-jax checkpoint: {CONFIG_FILE} is missing")
    with open(path) as f:
        return json.load(f)


def load_params(directory: str, target: Any | None = None) -> Any:
    """Restore the parameter tree; `target` is a tree of `jax.ShapeDtypeStruct` with shardings (or None: default)."""
    path = os.path.join(os.path.abspath(directory), PARAMS_DIR)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{directory} is not a uhd-jax checkpoint: {PARAMS_DIR}/ is missing")
    return ocp.StandardCheckpointer().restore(path, target)


def abstract_with_shardings(shapes: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
