"""`gather_taps` (the packed UHD layouts' bicubic / RoIAlign / JBU-neighbourhood op) and its hand-written gradient:
values and gradients equal those of the plain gather formulation differentiated by JAX."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uhd_jax.models.projectors.resampler import gather_taps


def plain_gather_taps(x, index, weight):
    b, shape, taps = index.shape[0], index.shape[1:-1], index.shape[-1]
    flat_i, flat_w = index.reshape(b, -1, taps), weight.reshape(b, -1, taps)
    xb = jnp.broadcast_to(x, (b, *x.shape[1:]))
    out = sum(flat_w[:, :, t, None] * jnp.take_along_axis(xb, flat_i[:, :, t, None], axis=1) for t in range(taps))
    return out.reshape(b, *shape, x.shape[-1])


# per-sample rows; one table shared by the batch (position tables); a shared table with fewer rows than taps (HiWin's
# 2x2 position grid), which gather_taps computes as one product with the taps' weights summed per row
@pytest.mark.parametrize("x_batch,rows", [(3, 11), (1, 11), (1, 4)])
def test_gather_taps_values_and_gradients(x_batch, rows):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(x_batch, rows, 5)), jnp.float32)
    index = jnp.asarray(rng.integers(0, rows, size=(3, 4, 2, 7)), jnp.int32)   # repeated rows: gradients accumulate
    weight = jnp.asarray(rng.normal(size=(3, 4, 2, 7)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(3, 4, 2, 5)), jnp.float32)
    np.testing.assert_allclose(gather_taps(x, index, weight), plain_gather_taps(x, index, weight), rtol=1e-6,
                               atol=1e-6)
    loss = lambda fn: lambda x, w: jnp.sum(fn(x, index, w) * cot)  # noqa: E731
    got = jax.grad(loss(gather_taps), argnums=(0, 1))(x, weight)
    want = jax.grad(loss(plain_gather_taps), argnums=(0, 1))(x, weight)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    # bf16 features: the gradient comes back in the input's dtype
    assert jax.grad(loss(gather_taps))(x.astype(jnp.bfloat16), weight).dtype == jnp.bfloat16
