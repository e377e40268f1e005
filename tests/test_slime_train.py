"""SliME's data path and its four training runs (spec §C.1, C.5, C.6): samples carry the global view and tiles with
the assembly's feature rows, and each stage of configs/slime.py trains exactly the parameters its run names."""
from __future__ import annotations

import json
import re

import flax.linen as nn
import jax
import numpy as np
from PIL import Image

from tests.config_helpers import on_synthetic_data
from uhd_jax.config_loading import load_config
from uhd_jax.data.image_processing import normalize
from uhd_jax.data.pipeline import Source
from uhd_jax.data.slicing import slime_tiles
from uhd_jax.models.projectors.slime import slime_feature_rows
from uhd_jax.models.vlm import init_fn
from uhd_jax.train.checkpoints import load_meta, load_params
from uhd_jax.train.param_tree import flatten
from uhd_jax.train.trainer import model_for_stage, preparer_factory, run_stage


def tiny_slime(data):
    return on_synthetic_data("configs/slime.py:tiny", data, batch_size=8, num_steps=1, save_every=100)


def test_slime_samples_carry_views_and_assembly_rows(synthetic_data, tmp_path):
    c = tiny_slime(synthetic_data)
    for stage, views in (("sft", "both"), ("mlp_adapter", "global"), ("local_compressor", "local")):
        cfg = model_for_stage(c, c.stages[stage])
        assert cfg.slime.views == views
        prep = preparer_factory(c, c.stages[stage], cfg)(Source(synthetic_data["train"][
            "sft" if stage == "sft" else "pretrain"], synthetic_data["images"]))
        tok = prep.tokenizer
        assert cfg.slime.separator_id == tok(",", add_special_tokens=False)["input_ids"][-1]
        samples = json.load(open(synthetic_data["train"]["sft" if stage == "sft" else "pretrain"]))
        sample = samples[3]
        ex = prep((3, sample))
        assert "skip" not in ex, ex
        image = Image.open(f"{synthetic_data['images']}/{sample['image']}").convert("RGB")
        glob, tiles, grid = slime_tiles(image, cfg.vision.image_size)
        rows = ex["image_map"][ex["image_map"] >= 0]
        np.testing.assert_array_equal(rows, slime_feature_rows(cfg.slime, grid))
        n_views = 1 if views == "global" else 1 + len(tiles)
        assert ex["pixels"].shape == (cfg.slime.views_per_image, 56, 56, 3)
        assert list(ex["pixel_valid"]) == [True] * n_views + [False] * (cfg.slime.views_per_image - n_views)
        np.testing.assert_array_equal(ex["pixels"][0], normalize(glob))
        if views != "global":
            np.testing.assert_array_equal(ex["pixels"][len(tiles)], normalize(tiles[-1]))
            assert not ex["pixels"][n_views:].any()
        # the image's slots are one contiguous run where the <image> placeholder was
        slots = np.flatnonzero(ex["image_map"] >= 0)
        assert (np.diff(slots) == 1).all() and len(slots) == len(rows)


# parameters each run trains (spec §C.6); everything else must stay bit-identical through the stage
TRAINED = {
    "mlp_adapter": r"projector/projection/.*",
    "attn_adapter": r"projector/attn/(?!pos_embed).*",
    "local_compressor": r"projector/sampler/post_qformer/(?!pos_embed).*",
    "sft": r"(projector/(?!attn/pos_embed|sampler/post_qformer/pos_embed|w_noise).*|llm/.*)",
}


def test_each_slime_run_trains_exactly_its_parameters(synthetic_data, tmp_path):
    c = tiny_slime(synthetic_data)
    # stage 1a starts from the random init of its seed (init depends on the seed alone, not on the mesh)
    cfg = model_for_stage(c, c.stages.mlp_adapter)
    before = {k: np.asarray(v) for k, v in flatten(nn.meta.unbox(
        jax.jit(init_fn(cfg))(jax.random.PRNGKey(c.seed))["params"])).items()}
    for name in c.stage_order:
        res = run_stage(c, name, str(tmp_path))
        assert res.step_compilations == 1
        after = {k: np.asarray(v) for k, v in flatten(load_params(res.final_dir)).items()}
        assert load_meta(res.final_dir)["model"]["slime"]["views"] == dict(
            mlp_adapter="global", attn_adapter="global", local_compressor="local").get(name, "both")
        changed = {k for k in after if not np.array_equal(after[k], before[k])}
        expected = {k for k in after if re.fullmatch(TRAINED[name], k)}
        # every trained tensor moved and nothing else did
        assert changed == expected, (name, sorted(changed ^ expected)[:10])
        before = after


def test_text_only_sample_beside_an_image_sample_stays_finite_in_training():
    """mix665k has text-only samples: a row without an image beside one with an image trains with finite loss and
    gradients (noise on), the router leaves the text row whole and drops only local tokens of the other."""
    import jax.numpy as jnp

    from uhd_jax.models.config import vlm_config
    from uhd_jax.models.vlm import VLM

    c = load_config("configs/slime.py:tiny")
    c.model.slime.update(separator_id=5, topp=0.5)
    cfg = vlm_config(c.model)
    params = nn.meta.unbox(jax.jit(init_fn(cfg))(jax.random.PRNGKey(0))["params"])
    rows = slime_feature_rows(cfg.slime, (2, 1))
    length = 8 + len(rows)
    ids = np.tile(np.arange(3, 3 + length, dtype=np.int32), (2, 1))
    image_map = np.full((2, length), -1, np.int32)
    image_map[0, 2:2 + len(rows)] = rows                     # row 0 has an image (2 tiles), row 1 is text only
    pixels = np.zeros((2, cfg.slime.views_per_image, 56, 56, 3), np.float32)
    pixels[0, :3] = np.random.default_rng(0).normal(size=(3, 56, 56, 3))
    valid = np.ones((2, length), bool)
    pos = np.broadcast_to(np.arange(length), (2, length))

    def loss(p):
        logits, _ = VLM(cfg).apply({"params": p}, jnp.asarray(ids), jnp.asarray(valid), jnp.asarray(pos),
                                   jnp.asarray(pixels), jnp.asarray(image_map), deterministic=False,
                                   rngs={"dropout": jax.random.PRNGKey(1)})
        return jnp.mean(jax.nn.logsumexp(logits, -1))

    value, grads = jax.value_and_grad(loss)(params)
    assert np.isfinite(float(value))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
    _, kept, _ = VLM(cfg).apply({"params": params}, jnp.asarray(ids), jnp.asarray(valid), jnp.asarray(pos),
                                jnp.asarray(pixels), jnp.asarray(image_map), method=VLM.embed_image_and_text)
    kept = np.asarray(kept)
    assert kept[1].all() and 0 < (~kept[0]).sum() < 2 * 4   # the router dropped some of row 0's 8 local tokens
