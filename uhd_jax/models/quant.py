"""Weight-only quantisation of the frozen base kernels under LoRA adapters (QLoRA).

A kernel of shape in_shape + out_shape (the `n_in` leading dims are contracted) is stored as
- "int8": int8 values of the kernel's shape and one float32 scale per output channel (shape out_shape), symmetric:
  w ~= q * scale with scale = max|w over the inputs| / 127;
- "int4": values in [-7, 7] packed two per int8 along the last input dim (shape in_shape[:-1] + (in_last / 2,) +
  out_shape) and one float32 scale per group of GROUP consecutive input rows (of the flattened input) and output
  channel (shape (in / group,) + out_shape).
Packing along the last input dim keeps every other dim, so the values carry the base kernel's logical axes and shard
as it does. The forward dequantises to the compute dtype right before the matmul (XLA fuses the two); values and
scales are frozen parameters named `kernel` / `kernel_scale`, so a trainable rule on `lora_` never reaches them.
A float checkpoint loads into a QLoRA model through `quantize_loaded`; a QLoRA run's own checkpoints hold the
quantised layout, which `dequantize_params` turns back into float kernels for merging and export.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("int8", "int4")
GROUP = 64
_QMAX = {"int8": 127, "int4": 7}


def check_mode(mode):
    if mode is not None and mode not in MODES:
        raise ValueError(f"lora.quant {mode!r}: choose None or one of {list(MODES)}")
    return mode


def group_size(n_rows: int) -> int:
    """Input rows per int4 scale: GROUP, or the largest divisor of the input size that divides GROUP."""
    return math.gcd(n_rows, GROUP)


def _check_int4(shape, n_in):
    if shape[n_in - 1] % 2:
        raise ValueError(f"int4 packs pairs along the last input dim, which is odd in kernel shape {tuple(shape)}")


def quantize(w, n_in: int, mode: str):
    """Float kernel (in_shape + out_shape) -> (values int8, scale float32)."""
    w = jnp.asarray(w, jnp.float32)
    in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
    qmax = _QMAX[mode]
    if mode == "int8":
        amax = jnp.max(jnp.abs(w), axis=tuple(range(n_in)))
        scale = jnp.where(amax > 0, amax / qmax, 1.0)
        q = jnp.clip(jnp.round(w / scale), -qmax, qmax).astype(jnp.int8)
        return q, scale
    _check_int4(w.shape, n_in)
    rows, cols = math.prod(in_shape), math.prod(out_shape)
    g = group_size(rows)
    wg = w.reshape(rows // g, g, cols)
    amax = jnp.max(jnp.abs(wg), axis=1)
    scale = jnp.where(amax > 0, amax / qmax, 1.0)
    q = jnp.clip(jnp.round(wg / scale[:, None, :]), -qmax, qmax).astype(jnp.int8).reshape(rows // 2, 2, cols)
    packed = jnp.left_shift(q[:, 1], 4) | (q[:, 0] & 0xF)   # high nibble: odd row, low nibble: even row
    packed = packed.astype(jnp.int8).reshape(in_shape[:-1] + (in_shape[-1] // 2,) + out_shape)
    return packed, scale.reshape((rows // g,) + out_shape)


def dequantize(q, scale, n_in: int, mode: str, dtype=jnp.float32):
    """(values, scale) -> the float kernel in `dtype` (products taken in float32)."""
    if mode == "int8":
        return (q.astype(jnp.float32) * scale.astype(jnp.float32)).astype(dtype)
    in_shape = q.shape[:n_in - 1] + (2 * q.shape[n_in - 1],)
    out_shape = q.shape[n_in:]
    rows, cols = math.prod(in_shape), math.prod(out_shape)
    p = q.reshape(rows // 2, cols)
    low = jnp.right_shift(jnp.left_shift(p, 4), 4)   # arithmetic shifts sign-extend each nibble
    high = jnp.right_shift(p, 4)
    vals = jnp.stack([low, high], axis=1).reshape(scale.shape[0], -1, cols).astype(jnp.float32)
    w = vals * scale.reshape(scale.shape[0], 1, cols).astype(jnp.float32)
    return w.reshape(in_shape + out_shape).astype(dtype)


def stored_shapes(shape, n_in: int, mode: str):
    """Kernel shape -> (values shape, scale shape) as stored."""
    shape = tuple(shape)
    in_shape, out_shape = shape[:n_in], shape[n_in:]
    if mode == "int8":
        return shape, out_shape
    _check_int4(shape, n_in)
    rows = math.prod(in_shape)
    return in_shape[:-1] + (in_shape[-1] // 2,) + out_shape, (rows // group_size(rows),) + out_shape


def scale_axes(axes, n_in: int, mode: str):
    out = tuple(axes[n_in:])
    return out if mode == "int8" else (None,) + out


def _quantize_node(kernel, lora_a, lora_b, mode):
    """Quantise one adapted kernel; a scanned stack (leading layer axis on kernel, A and B) layer by layer."""
    stacked = lora_a.ndim + lora_b.ndim - 2 > kernel.ndim
    n_in = lora_a.ndim - 1 - int(stacked)
    fn = (lambda k: quantize(k, n_in, mode))
    q, s = jax.vmap(fn)(kernel) if stacked else fn(kernel)
    return q, s


def _dequantize_node(q, scale, lora_a, lora_b, mode, dtype):
    stacked = lora_a.ndim + lora_b.ndim - 2 > q.ndim
    n_in = lora_a.ndim - 1 - int(stacked)
    fn = (lambda q_, s_: dequantize(q_, s_, n_in, mode, dtype))
    return jax.vmap(fn)(q, scale) if stacked else fn(q, scale)


def quantize_params(params, mode: str):
    """Every adapted layer's float `kernel` -> int values `kernel` + `kernel_scale` (pure; other leaves untouched)."""
    def walk(node):
        if not isinstance(node, dict):
            return node
        if "lora_a" in node and "lora_b" in node and "kernel" in node and "kernel_scale" not in node:
            q, s = _quantize_node(node["kernel"], node["lora_a"], node["lora_b"], mode)
            return dict(node, kernel=q, kernel_scale=s)
        return {k: walk(v) for k, v in node.items()}
    return walk(dict(params))


def dequantize_params(params, mode: str, dtype=jnp.float32):
    """The inverse layout of quantize_params: every quantised `kernel` + `kernel_scale` -> a float `kernel` (the base
    the adapters were trained on; numpy in, numpy out). Leaves without a `kernel_scale` are untouched."""
    check_mode(mode)

    def walk(node):
        if not isinstance(node, dict):
            return node
        if "kernel_scale" in node and "lora_a" in node and "lora_b" in node:
            w = _dequantize_node(jnp.asarray(node["kernel"]), jnp.asarray(node["kernel_scale"]), node["lora_a"],
                                 node["lora_b"], mode, dtype)
            out = {k: v for k, v in node.items() if k != "kernel_scale"}
            out["kernel"] = np.asarray(w) if isinstance(node["kernel"], np.ndarray) else w
            return out
        return {k: walk(v) for k, v in node.items()}
    return walk(dict(params))


def quantize_loaded(loaded: dict, model: dict) -> dict:
    """Flat '/'-keyed float tensors from a checkpoint -> the quantised layout where the (flat) model tree stores
    `kernel` + `kernel_scale` and the checkpoint holds only a float `kernel`. Mode from the model's value shape."""
    out = dict(loaded)
    for key in loaded:
        if not key.endswith("/kernel"):
            continue
        prefix = key[:-len("kernel")]
        if prefix + "kernel_scale" not in model or prefix + "kernel_scale" in loaded:
            continue
        a, b = model[prefix + "lora_a"], model[prefix + "lora_b"]
        mode = "int8" if tuple(model[key].shape) == tuple(loaded[key].shape) else "int4"
        q, s = _quantize_node(jnp.asarray(loaded[key]), a, b, mode)
        out[key], out[prefix + "kernel_scale"] = np.asarray(q), np.asarray(s)
    return out
