"""The memory-lean pieces of the `jbu` stage: the adaptive convolution's hand-written gradient and the attention
downsampler's one-image-at-a-time dropout scores equal JAX's autodiff of the plain formulas (float32, <= 1e-5), and
XLA's buffer assignment (`memory_analysis`, abstract inputs, never timing) keeps less for the backward pass."""

import jax
import jax.numpy as jnp
import numpy as np

from tests.torch_helpers import rel_err
from uhd_jax.models.projectors import jbu, vdim
from uhd_jax.perf.memory import analysis_bytes


def plain_dropout_scores(key, rows, hr, cols, weight, rate):
    """The whole batch's grid and masks at once, differentiated by JAX: what the downsampler kept before."""
    keep = 1.0 - rate
    grid = vdim.separable_apply(rows, hr.astype(jnp.float32), cols)
    mask = jnp.stack([jax.random.bernoulli(jax.random.fold_in(key, i), keep, grid.shape[1:])
                      for i in range(grid.shape[0])])
    return jnp.einsum("bijc,c->bij", jnp.where(mask, grid / keep, 0.0), weight)


def grad_temp_bytes(fn, *shapes):
    abstract = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=tuple(range(len(shapes)))))
    return analysis_bytes(grad.lower(*abstract).compile())["temp_bytes"]


def test_adaptive_conv_gradient_is_autodiffs_without_the_49_views():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 24, 20, 32)), jnp.float32)       # not square: rows and columns kept apart
    kernel = jnp.asarray(rng.normal(size=(2, 24, 20, 49)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(2, 24, 20, 32)), jnp.float32)
    results, temp = {}, {}
    for fn in (jbu.adaptive_conv, jbu.plain_adaptive_conv):
        step = jax.jit(jax.value_and_grad(lambda x, k, c: jnp.sum(fn(x, k) * c), argnums=(0, 1)))
        compiled = step.lower(x, kernel, cot).compile()
        results[fn.__name__], temp[fn.__name__] = compiled(x, kernel, cot), analysis_bytes(compiled)["temp_bytes"]
    (got, got_grads), (want, want_grads) = results["adaptive_conv"], results["plain_adaptive_conv"]
    assert rel_err(got, want) <= 1e-6
    for g, w in zip(got_grads, want_grads):
        assert rel_err(g, w) <= 1e-5
    # autodiff keeps the 49 views (or their cotangents) at once; the hand-written gradient x, the kernel and one view
    assert temp["plain_adaptive_conv"] > 4 * temp["adaptive_conv"], temp


def test_dropout_scores_match_the_whole_batch_formula_in_values_gradients_and_memory():
    rng = np.random.default_rng(1)
    b, h, c, out = 3, 8, 6, 28
    rows = jnp.asarray(rng.normal(size=(b, out, h)), jnp.float32)
    cols = jnp.asarray(rng.normal(size=(b, out, h)), jnp.float32)
    hr = jnp.asarray(rng.normal(size=(b, h, h, c)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(c,)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(b, out, out)), jnp.float32)
    key = jax.random.PRNGKey(4)
    scores_and_grads = lambda fn: jax.jit(lambda x, w: (  # noqa: E731
        fn(key, rows, x, cols, w, 0.2),
        jax.grad(lambda x, w: jnp.sum(fn(key, rows, x, cols, w, 0.2) * cot), argnums=(0, 1))(x, w)))
    (got, got_grads), (want, want_grads) = (scores_and_grads(fn)(hr, weight)
                                            for fn in (vdim.dropout_scores, plain_dropout_scores))
    assert rel_err(got, want) <= 1e-6
    assert rel_err(got, jnp.einsum("bijc,c->bij", vdim.separable_apply(rows, hr, cols), weight)) > 0.05  # live masks
    for g, w in zip(got_grads, want_grads):
        assert rel_err(g, w) <= 1e-5
    # 16 images of a 24x24 map pooled from 84^2: the plain gradient keeps every image's grid, mask and dropped copy
    shapes = dict(rows=(16, 84, 24), hr=(16, 24, 24, 64), cols=(16, 84, 24), weight=(64,))
    temp = {fn.__name__: grad_temp_bytes(lambda r, x, c, w: fn(key, r, x, c, w, 0.2), *shapes.values())
            for fn in (vdim.dropout_scores, plain_dropout_scores)}
    assert temp["plain_dropout_scores"] > 6 * temp["dropout_scores"], temp
