"""Patch-budget buckets: a batch packs its slices into the smallest of a few static budgets that holds them, so the
tower's per-token layers stop running over the padding of the full budget, with the same outputs (tests/test_uhd_v1.py's
batch-invariance test: greedy tokens at the full budget equal those in buckets) and a bounded number of compiles."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.uhd_helpers import tiny_uhd
from uhd_jax.data.packing import pack_images_for_vit
from uhd_jax.data.uhd_images import (PackedLayout, bucket_budget, bucketed, budget_buckets, fill_row, fit_to_bucket,
                                     patches_needed)
from uhd_jax.models.vit import ViTConfig, VisionTransformer
from uhd_jax.perf.flops import vit_forward_flops

# Same tower as tests/test_vit_rows.py: patch 2 on 16 px, an 8x8 grid, 65 slots per full image.
CFG = ViTConfig(hidden_size=96, intermediate_size=384, num_layers=3, num_heads=4, patch_size=2, image_size=16,
                select_layer=-1)
SIZES = [(8, 8), (7, 9), (6, 10), (9, 7)]   # patches 64, 63, 60, 63: 254 slots
FULL = 8 * 65                               # the default budget of 7 slices + an overview: 520 slots


def test_buckets_are_eighths_of_the_budget():
    assert budget_buckets(4616) == (577, 1154, 1731, 2308, 2885, 3462, 4039, 4616)
    assert budget_buckets(100, 3) == (34, 67, 100)            # ceil: the largest is the full budget
    assert budget_buckets(4616, 1) == (4616,)
    assert bucket_budget(3859, 4616) == 4039                  # the 672x1088 image of UHD v1: 7 views, 3859 slots
    assert bucket_budget(577, 4616) == 577 and bucket_budget(578, 4616) == 1154
    assert bucket_budget(5000, 4616) == 4616                  # over budget: fill_row names the excess
    small = bucketed(PackedLayout(patch_budget=4616, max_images=8, jbu=True), 1000)
    assert small.patch_budget == 1154 and small.level_budget(4) == 16 * 1154


def test_cutting_a_full_pack_equals_packing_at_the_bucket():
    """`fit_to_bucket` of arrays packed at the full budget equals packing straight into the bucket, JBU levels
    included; the arrays without a slot axis stay as they are."""
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(2 * h, 2 * w, 3)).astype(np.float32) for h, w in [(4, 5), (6, 3)]]
    layout = PackedLayout(patch_budget=FULL, max_images=8, patch_size=2, vit_grid=8, query_grid=4, windowed=True,
                          jbu=True)
    full = layout.zeros(2)
    fill_row(full, 0, images, layout)
    fill_row(full, 1, images[:1], layout)
    cut, small = fit_to_bucket(full, layout)
    assert small.patch_budget == 65   # 21 + 19 slots
    direct = small.zeros(2)
    fill_row(direct, 0, images, small)
    fill_row(direct, 1, images[:1], small)
    assert cut.keys() == direct.keys()
    for key in direct:
        np.testing.assert_array_equal(cut[key], direct[key], err_msg=key)
    assert cut["l4_guidance"].shape[1] == 16 * 65 and cut["roi_index"].shape == full["roi_index"].shape


def xla_vit_ratio(budget):
    vit = VisionTransformer(CFG)
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(2 * h, 2 * w, 3)).astype(np.float32) for h, w in SIZES]
    packed = pack_images_for_vit([images], budget, patch=2, grid=8)
    params = jax.eval_shape(vit.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, packed))
    encode = jax.jit(lambda p, x: vit.apply(p, x, method=VisionTransformer.encode_packed))
    cost = encode.lower(*abstract).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) / vit_forward_flops(CFG, [1 + h * w for h, w in SIZES])


def test_the_bucket_brings_xla_to_the_per_image_formula():
    """At the full budget the padding slots double the count (520 slots for 254); the bucket (260) brings it to
    <= 1.10x the per-image formula."""
    need = sum(1 + h * w for h, w in SIZES)
    budget = bucket_budget(need, FULL)
    assert budget == 260
    assert xla_vit_ratio(FULL) > 1.5
    assert 0.95 <= xla_vit_ratio(budget) <= 1.10


@pytest.fixture(scope="module")
def tiny_generation(synthetic_data):
    from transformers.models.auto.tokenization_auto import AutoTokenizer

    from uhd_jax.data.dataset import read_samples
    from uhd_jax.models.vlm import init_fn
    from uhd_jax.train.trainer import model_for_stage, packed_layout, preparer_factory, stage_sources

    c = tiny_uhd(synthetic_data)
    cfg = model_for_stage(c, c.stages.sft)
    prep = preparer_factory(c, c.stages.sft, cfg)(stage_sources(c, c.stages.sft)[0])
    prompts = [prep.prompt(s) for s in read_samples(os.path.join(synthetic_data["root"], "eval_sft.json"))]
    tok = AutoTokenizer.from_pretrained(synthetic_data["tokenizer"])
    return cfg, prompts, tok, packed_layout(c, cfg), init_fn(cfg)


def test_batches_pick_from_at_most_eight_budgets(tiny_generation):
    """Host side only: each batch's budget is the smallest bucket holding its largest prompt, from the 8 buckets."""
    from uhd_jax.eval.decoding import GenerationConfig
    from uhd_jax.eval.generate import Generator

    cfg, prompts, tok, layout, _ = tiny_generation
    g = Generator(cfg, None, tok, GenerationConfig(max_new_tokens=2), batch_size=2, packed_layout=layout)
    budgets = set()
    for i in range(0, len(prompts) - 1, 2):
        images, budget = g.packed(prompts[i:i + 2])
        need = max(patches_needed(list(p["pixels"]), layout.patch_size) for p in prompts[i:i + 2])
        assert need <= budget < need + layout.patch_budget / 8 and images["patches"].shape[1] == budget
        budgets.add(budget)
    assert 1 < len(budgets) <= 8 and budgets <= set(budget_buckets(layout.patch_budget))
