"""Audit of what reaches the attention entry point (`uhd_jax.models.layers.dot_product_attention`).

    with recorded_attention_calls() as calls:
        jax.make_jaxpr(fn)(*args)       # or eval_shape / a jit call: anything that traces
    assert_no_dense_masks(calls)

Tracing caches are cleared on entry and exit, so functions traced before are traced again through the spy.
"""
from __future__ import annotations

import contextlib
import dataclasses

import jax

from uhd_jax.models import layers


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    q_shape: tuple
    k_shape: tuple
    mask_shape: tuple | None
    bias_shape: tuple | None
    is_causal: bool
    has_lengths: bool
    implementation: str | None

    @property
    def dense_footprint(self) -> bool:
        """A mask or bias spanning queries x keys, (T, S) in its last two dims, that is O(T * S) memory."""
        t, s = self.q_shape[1], self.k_shape[1]
        return any(shape is not None and len(shape) >= 2 and tuple(shape[-2:]) == (t, s)
                   for shape in (self.mask_shape, self.bias_shape))


@contextlib.contextmanager
def recorded_attention_calls():
    """Yields the list of `AttentionCall`s made while tracing inside the block."""
    calls: list[AttentionCall] = []
    original = layers.dot_product_attention

    def spy(q, k, v, **kw):
        mask, bias = kw.get("mask"), kw.get("bias")
        calls.append(AttentionCall(tuple(q.shape), tuple(k.shape), None if mask is None else tuple(mask.shape),
                                   None if bias is None else tuple(bias.shape), bool(kw.get("is_causal", False)),
                                   kw.get("kv_lengths") is not None, kw.get("implementation")))
        return original(q, k, v, **kw)

    jax.clear_caches()
    layers.dot_product_attention = spy
    try:
        yield calls
    finally:
        layers.dot_product_attention = original
        jax.clear_caches()


def assert_no_dense_masks(calls: list[AttentionCall], *, expect_calls: bool = True):
    if expect_calls:
        assert calls, "no attention call was traced: the audit saw nothing (was the function traced at all?)"
    dense = [c for c in calls if c.dense_footprint]
    assert not dense, f"{len(dense)} attention call(s) got a (T, S) mask or bias: {dense[:3]}"
