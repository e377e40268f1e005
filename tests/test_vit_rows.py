"""The packed ViT attends within each image only: no score between two images, no (N, N) mask, and XLA's FLOP count
of a packed forward close to the per-image formula (spec: each slice is encoded on its own)."""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from tests.attention_helpers import assert_no_dense_masks, recorded_attention_calls
from uhd_jax.data.packing import pack_images_for_vit
from uhd_jax.models.vit import ViTConfig, VisionTransformer
from uhd_jax.perf.flops import vit_forward_flops

# Patch 2 keeps the images small in pixels and long in tokens, so attention is a real share of the work (as in
# CLIP-L on 336^2 slices, where it is ~9%) and masked cross-image scores would show in the count.
CFG = ViTConfig(hidden_size=96, intermediate_size=384, num_layers=3, num_heads=4, patch_size=2, image_size=16,
                select_layer=-1)
SIZES = [(8, 8), (7, 9), (6, 10), (9, 7)]   # patches (h, w): 64, 63, 60, 63 of the 8x8 = 64 a cap allows
BUDGET = sum(1 + h * w for h, w in SIZES)   # 254 slots, none spare: a tight budget, as a serving bucket would be


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)


@pytest.fixture(scope="module")
def packed_case():
    vit = VisionTransformer(CFG)
    params = jax.jit(vit.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(2 * h, 2 * w, 3)).astype(np.float32) for h, w in SIZES]
    packed = jax.tree_util.tree_map(jnp.asarray, pack_images_for_vit([images], BUDGET, patch=2, grid=8))
    return vit, params, images, packed


def encode(vit):
    return lambda p, x: vit.apply(p, x, method=VisionTransformer.encode_packed)


def test_each_packed_image_equals_the_image_alone(packed_case):
    vit, params, images, packed = packed_case
    hidden = jax.jit(encode(vit))(params, packed)
    offset = 0
    for img in images:
        n = (img.shape[0] // 2) * (img.shape[1] // 2)
        alone = jax.jit(vit.apply)(params, jnp.asarray(img[None]))[0]
        assert rel_err(hidden[0, offset + 1:offset + 1 + n], alone) <= 1e-5
        offset += 1 + n


def square_shapes(jaxpr, n):
    """Shapes of every value in the program (nested jaxprs included) with two or more dims of size n (XLA's
    attention lays scores out as (B, K, T, G, S): T and S need not be adjacent)."""
    found = []
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            shape = getattr(var.aval, "shape", ())
            if sum(d == n for d in shape) >= 2:
                found.append((str(eqn.primitive), shape))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += square_shapes(sub, n)
    return found


def test_no_row_square_scores_or_mask(packed_case):
    """No attention call gets a (T, S) mask, neither a (N, N) mask nor (N, N) scores exist anywhere in the traced
    forward, and the scores are per image, T x T."""
    vit, params, _, packed = packed_case
    with recorded_attention_calls() as calls:
        jaxpr = jax.make_jaxpr(encode(vit))(params, packed).jaxpr
    assert_no_dense_masks(calls)
    assert len(calls) == CFG.num_computed_layers and all(c.has_lengths and c.mask_shape is None for c in calls)
    assert square_shapes(jaxpr, BUDGET) == []
    t = CFG.image_tokens
    scores = [s for p, s in square_shapes(jaxpr, t) if p == "dot_general"]
    assert scores and all(s[0] == len(SIZES) for s in scores)   # one T x T block per image slot, per layer


def test_xla_counts_the_per_image_formula(packed_case):
    """XLA's count of the compiled packed forward <= 1.10x the formula's per-image count (the dense-mask version
    counted the whole row's N^2 scores: 1.37x on these shapes)."""
    vit, params, _, packed = packed_case
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, packed))
    cost = jax.jit(encode(vit)).lower(*abstract).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    formula = vit_forward_flops(CFG, [1 + h * w for h, w in SIZES])
    ratio = float(cost["flops"]) / formula
    assert 0.95 <= ratio <= 1.10, ratio
