"""LoRA adapters on the LLM's linear layers, as PEFT defines them.

y = x . W + (dropout(x) . A . B) * alpha / rank, with A (in..., rank) initialised as PEFT's
`kaiming_uniform_(a=sqrt(5))` (uniform in +-1/sqrt(fan_in)) and B (rank, out...) zero, so an untrained adapter leaves
the model unchanged. The adapter lives beside its base kernel (`.../q/kernel`, `.../q/lora_a`, `.../q/lora_b`), so a
base checkpoint loads unchanged and a trainable rule such as `llm/.*lora_.*` names the adapters. A carries the base
kernel's input axis names and B its output axis names, so adapters shard as their base weights do.

The adapters are stored in float32 whatever the base's `param_dtype` (fp32 master weights over a bf16 base). Dropout
is live exactly when the caller supplies a 'dropout' rng (the training step does; generation and evaluation do not).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uhd_jax.models import layers, quant

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS
    quant: str | None = None   # QLoRA: the adapted base kernels stored as "int8" or "int4" (uhd_jax.models.quant)

    def __post_init__(self):
        quant.check_mode(self.quant)
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        unknown = set(self.targets) - set(TARGETS)
        if unknown or not self.targets:
            raise ValueError(f"lora.targets {list(self.targets)}: choose a non-empty subset of {list(TARGETS)}")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def lora_config(section) -> LoraConfig | None:
    """`config.model.llm.lora` (None, or a dict with rank / alpha / dropout / targets) -> LoraConfig."""
    if section is None or isinstance(section, LoraConfig):
        return section
    section = dict(section.to_dict() if hasattr(section, "to_dict") else section)
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    if set(section) - known:
        raise ValueError(f"config.model.llm.lora has unknown keys {sorted(set(section) - known)}; known: "
                         f"{sorted(known)}")
    if "targets" in section:
        section["targets"] = tuple(section["targets"])
    return LoraConfig(**section)


def kaiming_a_init(n_in: int):
    """PEFT's A init: torch `kaiming_uniform_(a=sqrt(5))` on the (rank, fan_in) weight, i.e. U(+-1/sqrt(fan_in))."""
    def init(key, shape, dtype=jnp.float32):
        bound = 1.0 / math.sqrt(math.prod(shape[:n_in]))
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


class LoraDenseGeneral(layers.DenseGeneral):
    """`layers.DenseGeneral` plus a rank-`rank` adapter (same parameter names for the base)."""

    rank: int = 8
    scaling: float = 2.0
    dropout: float = 0.0
    quant: str | None = None

    def _quantized_base(self, x, n_in):
        """The base matmul over a frozen quantised kernel, dequantised to the compute dtype just before the dot."""
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        shape = x.shape[x.ndim - n_in:] + features
        q_shape, s_shape = quant.stored_shapes(shape, n_in, self.quant)
        q0 = s0 = None
        if self.is_initializing():   # a fresh base: the float init, quantised (values and scales from one draw)
            q0, s0 = quant.quantize(self.kernel_init(self.make_rng("params"), shape, jnp.float32), n_in, self.quant)
        q = self.param("kernel", nn.with_logical_partitioning(lambda *_: q0, tuple(self.axes)))
        s = self.param("kernel_scale", nn.with_logical_partitioning(
            lambda *_: s0, quant.scale_axes(self.axes, n_in, self.quant)))
        if tuple(q.shape) != q_shape or tuple(s.shape) != s_shape:
            raise ValueError(f"{self.name}: quantised kernel {q.shape} / scale {s.shape}, expected {q_shape} / "
                             f"{s_shape} for {self.quant}")
        w = quant.dequantize(q, s, n_in, self.quant, self.dtype)
        y = layers.dot_trailing(x.astype(self.dtype), w, n_in)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                                   tuple(self.axes[n_in:])),
                              features, self.param_dtype)
            y = y + jnp.asarray(bias, self.dtype)
        return y

    @nn.compact
    def __call__(self, x):
        axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        n_in = len(axis)
        y = self._quantized_base(x, n_in) if self.quant else super().__call__(x)
        in_shape = x.shape[x.ndim - n_in:]
        out_shape = y.shape[y.ndim - (len(self.axes) - n_in):]
        a = self.param("lora_a", nn.with_logical_partitioning(kaiming_a_init(n_in), tuple(self.axes[:n_in]) + (None,)),
                       in_shape + (self.rank,), jnp.float32)
        b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                              (None,) + tuple(self.axes[n_in:])),
                       (self.rank,) + out_shape, jnp.float32)
        h = x.astype(self.dtype)
        if self.dropout > 0.0 and self.has_rng("dropout"):
            h = nn.Dropout(self.dropout, deterministic=False)(h)
        h = layers.dot_trailing(h, jnp.asarray(a, self.dtype), n_in)
        h = layers.dot_trailing(h, jnp.asarray(b, self.dtype))
        return y + (h * self.scaling).astype(y.dtype)


def dense(lora: LoraConfig | None, features, *, axes: Sequence[str | None], name: str, dtype: Any, param_dtype: Any,
          use_bias: bool = True, axis=-1):
    """`layers.dense`, with an adapter when `lora` targets `name`."""
    if lora is None or name not in lora.targets:
        return layers.dense(features, axes=axes, name=name, dtype=dtype, param_dtype=param_dtype, use_bias=use_bias,
                            axis=axis)
    return LoraDenseGeneral(features=features, axes=tuple(axes), axis=axis, use_bias=use_bias, dtype=dtype,
                            param_dtype=param_dtype, kernel_init=layers.default_kernel_init, rank=lora.rank,
                            scaling=lora.scaling, dropout=lora.dropout, quant=lora.quant, name=name)


def _is_adapted(node) -> bool:
    return isinstance(node, dict) and "lora_a" in node and "lora_b" in node and "kernel" in node


def merge_adapters(params, scaling: float):
    """W + scaling * A . B for every adapted layer (as the originals' merge_lora_weights.py / PEFT's
    merge_and_unload), adapters dropped: the tree of a model without LoRA. Works on a scanned stack too (a leading
    layer axis on kernel, A and B). Computed in float32 and stored in the kernel's dtype."""
    def walk(node):
        if not isinstance(node, dict):
            return node
        if _is_adapted(node):
            if "kernel_scale" in node:
                raise ValueError("merge_adapters takes a float base; dequantise a QLoRA tree first "
                                 "(quant.dequantize_params, as uhd-convert export does)")
            kernel, a, b = node["kernel"], node["lora_a"], node["lora_b"]
            stacked = a.ndim + b.ndim - 2 > kernel.ndim   # scan: a leading layer axis on all three
            if stacked:
                delta = jax.vmap(lambda a_, b_: jnp.tensordot(a_, b_, axes=1))(
                    jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
            else:
                delta = jnp.tensordot(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), axes=1)
            merged = (jnp.asarray(kernel, jnp.float32) + scaling * delta).astype(kernel.dtype)
            out = {k: v for k, v in node.items() if k not in ("lora_a", "lora_b")}
            out["kernel"] = np.asarray(merged) if isinstance(kernel, np.ndarray) else merged
            return out
        return {k: walk(v) for k, v in node.items()}
    return walk(dict(params))


def adapter_paths(params) -> list[str]:
    """'/'-joined paths of every adapter tensor in `params`."""
    out = []

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}/{k}" if prefix else k)
        elif prefix.rsplit("/", 1)[-1] in ("lora_a", "lora_b"):
            out.append(prefix)
    walk(params, "")
    return out


def _adapter_summary(flat: dict) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(targets, ranks) of the adapters in a flat '/'-keyed tree; A is (in..., rank) with or without a layer axis."""
    targets = {k.rsplit("/", 2)[-2] for k in flat if k.endswith("/lora_a")}
    ranks = {int(v.shape[-1]) for k, v in flat.items() if k.endswith("/lora_a")}
    return tuple(t for t in TARGETS if t in targets), tuple(sorted(ranks))


def check_init_adapters(loaded: dict, model: dict, src: str) -> None:
    """A checkpoint's LoRA adapters against the model's, both flat '/'-keyed: one line (a UserError) when the
    checkpoint holds adapters of another rank or on other targets than the stage's `lora`, or the stage has none.
    A checkpoint without adapters (a base) always fits: the stage's adapters start from PEFT's init."""
    from uhd_jax.cli_errors import UserError

    have_targets, have_ranks = _adapter_summary(loaded)
    if not have_targets:
        return
    want_targets, want_ranks = _adapter_summary(model)
    held = f"init checkpoint {src} holds rank-{'/'.join(map(str, have_ranks))} LoRA adapters on {list(have_targets)}"
    if not want_targets:
        raise UserError(f"{held} but the stage has no lora: give it lora=dict(rank={have_ranks[0]}, "
                        f"targets={list(have_targets)}, ...) to go on training them, or start from a merged export")
    if have_ranks != want_ranks:
        raise UserError(f"{held}; the stage's lora.rank is {'/'.join(map(str, want_ranks))}: set it to "
                        f"{have_ranks[0]}, or start from a checkpoint without adapters")
    if have_targets != want_targets:
        raise UserError(f"{held}; the stage's lora.targets are {list(want_targets)}: set them to "
                        f"{list(have_targets)}, or start from a checkpoint without adapters")
