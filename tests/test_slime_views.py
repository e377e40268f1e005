"""SliME's vision tower encodes only the views some position reads (the global view and the tiles a grid has), in a
per-batch budget of rows: the same logits as encoding every slot, the tower's work scaled to the real views (XLA's
count), and a batch over its budget stops with an error instead of losing views."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uhd_jax.configs.common import TINY_LLM, TINY_VISION
from uhd_jax.models.config import vlm_config
from uhd_jax.models.projectors.slime import slime_feature_rows
from uhd_jax.models.vlm import VLM, init_fn
from uhd_jax.perf import flops

GRIDS = [(2, 1), (2, 2)]          # 2 and 4 tiles: 3 + 5 = 8 real views of the 2 x 8 slots


def model_config(views_per_sample: float, views: str = "both"):
    slime = dict(views=views, topp=0.95, separator_id=5, global_grid=4, local_grid=2, max_tiles=7,
                 views_per_sample=views_per_sample)
    # one LLM layer, two vision layers (one computed): the towers only carry the views to the projector here
    return vlm_config(dict(vision=dict(TINY_VISION, num_layers=2), llm=dict(TINY_LLM, num_layers=1),
                           projector_type="gated", slime=slime, dtype="float32"))


def batch(cfg):
    c = cfg.slime
    rng = np.random.default_rng(0)
    length = 6 + c.rows_per_image
    ids = rng.integers(10, 100, (len(GRIDS), length)).astype(np.int32)
    image_map = np.full(ids.shape, -1, np.int32)
    valid = np.zeros(ids.shape, bool)
    pixels = np.zeros((len(GRIDS), c.views_per_image, 56, 56, 3), np.float32)
    for row, grid in enumerate(GRIDS):
        rows = slime_feature_rows(c, grid)
        image_map[row, 3:3 + len(rows)] = rows
        valid[row, :6 + len(rows)] = True
        n_views = 1 if c.views == "global" else 1 + grid[0] * grid[1]
        pixels[row, :n_views] = rng.normal(size=(n_views, 56, 56, 3))
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), ids.shape)
    return tuple(jnp.asarray(a) for a in (ids, valid, positions, pixels, image_map))


@pytest.fixture(scope="module")
def params():
    return jax.jit(init_fn(model_config(0)))(jax.random.PRNGKey(0))


def embed(cfg):
    """The LLM's inputs (embeddings, token_valid after the router, positions): equal inputs, equal logits."""
    return lambda p, *x: VLM(cfg).apply(p, *x, method=VLM.embed_image_and_text)


@pytest.mark.parametrize("views", ["both", "local"])
def test_budgeted_views_give_the_llm_inputs_of_every_slot(params, views):
    every, budgeted = model_config(0, views), model_config(4, views)   # 4 per sample: exactly the 8 real views
    x = batch(every)
    want_embeds, want_valid, want_pos = jax.jit(embed(every))(params, *x)
    got_embeds, got_valid, got_pos = jax.jit(embed(budgeted))(params, *x)
    np.testing.assert_array_equal(got_valid, want_valid)
    np.testing.assert_array_equal(got_pos, want_pos)
    valid = np.asarray(want_valid)
    assert valid[:, 3:].sum() < valid[:, 3:].size   # the router dropped tokens (in both) or the padding is there
    np.testing.assert_allclose(np.asarray(got_embeds)[valid], np.asarray(want_embeds)[valid], rtol=1e-5, atol=1e-6)


def xla_flops(fn, *args):
    """XLA's count of the lowered program (no compile needed)."""
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    return flops.xla_flops(jax.jit(fn).lower(*abstract))


def test_vision_work_scales_with_the_real_views(params):
    """Tower FLOPs with the budget <= real views / slots x the tower's FLOPs on every slot, + 5% (XLA's counts: the
    embedding with and without the budget differ only in the tower's rows)."""
    every, budgeted = model_config(0), model_config(4)
    x = batch(every)
    saved = xla_flops(embed(every), params, *x) - xla_flops(embed(budgeted), params, *x)
    slots = x[3].reshape(-1, 56, 56, 3)
    tower_all = xla_flops(lambda p, v: VLM(every).apply(p, v, method=lambda m, v: m.vision(v)), params, slots)
    tower_budgeted = tower_all - saved
    real = sum(1 + c * r for c, r in GRIDS)
    assert tower_budgeted <= (real / slots.shape[0]) * tower_all * 1.05, (tower_budgeted, tower_all)


def test_a_batch_over_its_view_budget_stops_with_an_error(params):
    cfg = model_config(3)   # 6 rows for 8 real views
    with pytest.raises(Exception, match="8 views to encode, more than its budget of 6"):
        jax.block_until_ready(jax.jit(embed(cfg))(params, *batch(cfg)))
