"""Experiment config (ml_collections ConfigDict, `config.model`) <-> the frozen dataclasses the modules take."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from uhd_jax.models.llama import LlamaConfig, RopeScaling
from uhd_jax.models.lora import lora_config
from uhd_jax.models.projectors.slime import SlimeConfig
from uhd_jax.models.vit import ViTConfig
from uhd_jax.models.vlm import VLMConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Keys of `config.model` that apply to every tower unless a tower overrides them.
_SHARED = ("dtype", "param_dtype", "attention_impl", "remat_policy")


def _dtype(name):
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def _fields(cls, section: Mapping[str, Any], shared: Mapping[str, Any], where: str) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(section) - names
    if unknown:
        raise ValueError(f"config.model.{where} has unknown keys {sorted(unknown)}; known: {sorted(names)}")
    out = {k: v for k, v in shared.items() if k in names}
    out.update(section)
    for k in ("dtype", "param_dtype"):
        if k in out and isinstance(out[k], str):
            out[k] = _dtype(out[k])
    return out


def _as_dict(model) -> dict:
    return dict(model.to_dict() if hasattr(model, "to_dict") else model)


def vit_config(model: Mapping[str, Any]) -> ViTConfig:
    model = _as_dict(model)
    shared = {k: model[k] for k in _SHARED if k in model}
    return ViTConfig(**_fields(ViTConfig, dict(model["vision"]), shared, "vision"))


def llm_config(model: Mapping[str, Any]) -> LlamaConfig:
    model = _as_dict(model)
    shared = {k: model[k] for k in _SHARED if k in model}
    section = dict(model["llm"])
    scaling = section.pop("rope_scaling", None)
    lora = section.pop("lora", None)
    llm = _fields(LlamaConfig, section, shared, "llm")
    llm["rope_scaling"] = RopeScaling(**scaling) if scaling else None
    llm["lora"] = lora_config(lora)
    if "scan_layers" in model:
        llm["scan_layers"] = model["scan_layers"]
    return LlamaConfig(**llm)


def slime_config(model: Mapping[str, Any]) -> SlimeConfig | None:
    section = model.get("slime")
    if model.get("projector_type") != "gated":
        if section:
            raise ValueError(f"config.model.slime is set but projector_type is {model.get('projector_type')!r}, "
                             f"not 'gated'")
        return None
    return SlimeConfig(**_fields(SlimeConfig, dict(section or {}), {}, "slime"))


def vlm_config(model: Mapping[str, Any]) -> VLMConfig:
    """Build the module config from `config.model` (a ConfigDict or plain dict)."""
    model = _as_dict(model)
    return VLMConfig(
        vision=vit_config(model), llm=llm_config(model), projector_type=model.get("projector_type", "mlp2x_gelu"),
        vision_trainable=model.get("vision_trainable", False), resampler_heads=model.get("resampler_heads", 0),
        feature_scale_mask=model.get("feature_scale_mask", 5), slime=slime_config(model),
        dtype=_dtype(model.get("dtype", "float32")), param_dtype=_dtype(model.get("param_dtype", "float32")))
