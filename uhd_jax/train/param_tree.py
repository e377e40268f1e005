"""Flat '/'-joined parameter paths, and stacking of per-layer parameters for `scan_layers` models."""
from __future__ import annotations

import re

import numpy as np
from flax import traverse_util

_LAYER = re.compile(r"^(?P<pre>.*/)?layers_(?P<i>\d+)/(?P<rest>.*)$")


def flatten(tree) -> dict:
    return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: dict) -> dict:
    return traverse_util.unflatten_dict(flat, sep="/")


def stack_layers(flat: dict, prefix: str) -> dict:
    """'{prefix}/layers_{i}/x' (i = 0..n-1) -> '{prefix}/layers/x' with a leading layer axis."""
    out, groups = {}, {}
    for key, value in flat.items():
        m = _LAYER.match(key)
        if m and (m.group("pre") or "") == prefix + "/":
            groups.setdefault(m.group("rest"), {})[int(m.group("i"))] = value
        else:
            out[key] = value
    for rest, by_layer in groups.items():
        n = max(by_layer) + 1
        if sorted(by_layer) != list(range(n)):
            raise ValueError(f"{prefix}/layers_*/{rest}: layers {sorted(set(range(n)) - set(by_layer))} missing")
        out[f"{prefix}/layers/{rest}"] = np.stack([by_layer[i] for i in range(n)])
    return out


def match_layer_layout(flat: dict, *, scanned: bool, want_scanned: bool, prefix: str = "llm") -> dict:
    """Convert between per-layer (`layers_{i}`) and scanned (`layers`) parameter names as a model needs."""
    if want_scanned and not scanned:
        return stack_layers(flat, prefix)
    if scanned and not want_scanned:
        return unstack_layers(flat, prefix)
    return flat


def unstack_layers(flat: dict, prefix: str) -> dict:
    out = {}
    head = f"{prefix}/layers/"
    for key, value in flat.items():
        if key.startswith(head):
            for i in range(value.shape[0]):
                out[f"{prefix}/layers_{i}/{key[len(head):]}"] = value[i]
        else:
            out[key] = value
    return out
