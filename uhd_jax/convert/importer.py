"""PyTorch checkpoints -> our parameter tree, streamed one tensor at a time, every mismatch reported at once."""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from uhd_jax.convert import tables
from uhd_jax.convert.torch_io import iter_tensors, list_keys
from uhd_jax.train.param_tree import flatten, match_layer_layout, unflatten
from uhd_jax.models import config as model_config
from uhd_jax.models.llama import Llama
from uhd_jax.models.vit import VisionTransformer
from uhd_jax.models.vlm import init_fn

COMPONENTS = ("vision", "projector", "llm")


class CheckpointMismatchError(ValueError):
    """Raised once with every missing, unexpected and mis-shaped tensor of a conversion."""

    def __init__(self, missing, unexpected, misshaped, empty_components=()):
        self.missing, self.unexpected, self.misshaped = list(missing), list(unexpected), list(misshaped)
        self.empty_components = list(empty_components)
        lines = ["checkpoint does not match the model:"]
        for comp, hint in self.empty_components:
            lines.append(f"  component '{comp}': no tensors found in any source ({hint})")
        lines += [f"  missing: {k} (torch {s})" for k, s in self.missing]
        lines += [f"  unexpected: {k} in {f}" for k, f in self.unexpected]
        lines += [f"  mis-shaped: {k} in {f}: got {g}, expected {e}" for k, f, g, e in self.misshaped]
        lines.append("Fix: check --config/--layout match the checkpoint, or pass the missing parts "
                     "(--vision for the CLIP tower, --projector for mm_projector.bin).")
        super().__init__("\n".join(lines))


@dataclasses.dataclass
class Source:
    path: str
    layout: str | None = None  # None: detect from the keys


def expected_params(model: dict, components) -> dict:
    """Flat path -> ShapeDtypeStruct of the (unscanned) parameters of `components` of the model `model`."""
    model = dict(model, scan_layers=False)
    param_dtype = model_config.DTYPES[model.get("param_dtype", "float32")]
    rng = jax.random.PRNGKey(0)
    if {"vision", "llm"} <= set(model) and "projector" in components:
        boxed = jax.eval_shape(init_fn(model_config.vlm_config(model)), rng)
    elif "projector" in components:
        raise ValueError("converting a projector needs the model it belongs to: pass --config (e.g. "
                         "configs/llava15.py:7b)")
    else:
        boxed = {"params": {}}
        if "llm" in components:
            cfg = model_config.llm_config(model)
            e = jnp.zeros((1, 4, cfg.hidden_size), param_dtype)
            p = jnp.zeros((1, 4), jnp.int32)
            boxed["params"]["llm"] = jax.eval_shape(lambda r: Llama(cfg).init(r, e, p, jnp.ones((1, 4), bool)),
                                                    rng)["params"]
        if "vision" in components:
            cfg = model_config.vit_config(model)
            x = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels))
            boxed["params"]["vision"] = jax.eval_shape(lambda r: VisionTransformer(cfg).init(r, x), rng)["params"]
    flat = flatten(nn.meta.unbox(boxed["params"]))
    return {k: v for k, v in flat.items() if k.split("/")[0] in components}


def _resolve(key: str, layout: tables.Layout, projector_type: str):
    """(our path, rule) for a torch key, or (None, reason)."""
    candidates = sorted(((p, c) for c in layout.components for p in c.prefixes), key=lambda pc: -len(pc[0]))
    for prefix, comp in candidates:
        if key.startswith(prefix):
            rest = key[len(prefix):]
            for rule in comp.rules(projector_type):
                ours = rule.match_torch(rest)
                if ours is not None:
                    return f"{comp.ours}/{ours}", rule
    return None, None


def import_checkpoint(sources: list[Source], model: dict, param_dtype=np.float32):
    """Convert `sources` for the model described by `model` (a `config.model` dict).

    Returns (nested params as numpy, report dict). Raises CheckpointMismatchError listing every problem.
    """
    layouts = []
    for src in sources:
        name = src.layout or tables.detect_layout(list_keys(src.path))
        if name not in tables.LAYOUTS:
            raise ValueError(f"unknown layout {name!r}; known: {sorted(tables.LAYOUTS)}")
        layouts.append(tables.LAYOUTS[name])
    components = [c for c in COMPONENTS if any(comp.ours == c for lay in layouts for comp in lay.components)]
    components = [c for c in components if c in model or c == "projector"]
    expected = expected_params(model, components)
    scopes = [lay.scope for lay in layouts]
    if all(scopes):  # every source holds part of a component (a VDIM upsampler): expect just that part
        expected = {k: v for k, v in expected.items() if k.startswith(tuple(p for sc in scopes for p in sc))}
    projector_type = model.get("projector_type", "mlp2x_gelu")

    params, provided_by = {}, {}
    unexpected, misshaped, skipped, overridden = [], [], [], []
    reported = set()  # mis-shaped paths: reported once, not again as missing
    for src, layout in zip(sources, layouts):
        skip = [re.compile(s) for s in layout.skip]
        for key, array, file in iter_tensors(src.path):
            path, rule = _resolve(key, layout, projector_type)
            if path is None or path not in expected:
                if any(s.search(key) for s in skip):
                    skipped.append(key)
                else:
                    unexpected.append((key, file))
                continue
            want = rule.transform.torch_shape(expected[path].shape)
            if tuple(array.shape) != tuple(want):
                misshaped.append((key, file, tuple(array.shape), tuple(want)))
                reported.add(path)
                continue
            if path in params:
                overridden.append(f"{path}: {provided_by[path]} replaced by {key} ({file})")
            params[path] = rule.transform.to_ours(array, expected[path].shape).astype(param_dtype)
            provided_by[path] = f"{key} ({file})"
            del array

    hints = {"vision": "pass --vision with the CLIP checkpoint", "projector": "pass --projector mm_projector.bin",
             "llm": "pass the LLM checkpoint as --src"}
    empty = [(c, hints[c]) for c in components if not any(p.startswith(c + "/") for p in params)]
    empty_names = {c for c, _ in empty}
    missing = []
    for path, shape in expected.items():
        if path in params or path in reported or path.split("/")[0] in empty_names:
            continue
        rule_shape = _torch_shape_for(path, layouts, projector_type, shape.shape)
        missing.append((path, rule_shape))
    if missing or unexpected or misshaped or empty:
        raise CheckpointMismatchError(missing, unexpected, misshaped, empty)
    params = match_layer_layout(params, scanned=False, want_scanned=bool(model.get("scan_layers")))
    report = dict(sources=[s.path for s in sources], layouts=[lay.name for lay in layouts], components=components,
                  tensors=len(provided_by), skipped=skipped, overridden=overridden)
    return unflatten(params), report


def _torch_shape_for(path, layouts, projector_type, shape):
    comp, rel = path.split("/", 1)
    for layout in layouts:
        for c in layout.components:
            if c.ours != comp:
                continue
            for rule in c.rules(projector_type):
                if rule.match_ours(rel) is not None:
                    return f"{c.prefixes[0]}{rule.match_ours(rel)} {tuple(rule.transform.torch_shape(shape))}"
    return str(tuple(shape))
