"""SliME end to end (spec llava15_slime_llavar.md §C.4-C.5, C.9): an original-layout checkpoint (model.mm_projector.*,
model.sampler.*, Llama, CLIP) imported with our converter gives the logits of a PyTorch reference of the original's
assembly (global features, the separator embedding, the routed local tokens packed into a shorter sequence), on
real SliME tiles of images of two shapes; exported back, the tensors are the same."""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.test_slime import TorchGatedBlock, TorchQueryResampler, randomise, torch_router
from tests.torch_helpers import rel_err, tiny_clip, tiny_llama, to_nchw
from uhd_jax.convert.cli import main as convert_cli
from uhd_jax.convert.torch_io import iter_tensors
from uhd_jax.data.image_processing import normalize
from uhd_jax.data.slicing import slime_tiles
from uhd_jax.models.config import vlm_config
from uhd_jax.models.projectors.slime import SlimeConfig, slime_feature_rows
from uhd_jax.models.vlm import VLM
from uhd_jax.train.checkpoints import load_meta, load_params

SEPARATOR, IMAGE = 9, -200
TILE = 336            # real SliME geometry (24 x 24 patches per view) on a 32-wide CLIP


class TorchSlime:
    """The original's encode_images + prepare_inputs_labels_for_multimodal for one sample (batch size 1)."""

    def __init__(self, clip, block, sampler, llama, cfg: SlimeConfig):
        self.clip, self.block, self.sampler, self.llama, self.cfg = clip, block, sampler, llama, cfg

    @torch.no_grad()
    def logits(self, ids: list[int], views: np.ndarray, grid: tuple[int, int]) -> tuple[np.ndarray, int]:
        """ids with one IMAGE placeholder; views (1 + P, 336, 336, 3). Returns (logits (T, V), image token count)."""
        c = self.cfg
        feats = self.clip(pixel_values=to_nchw(views), output_hidden_states=True).hidden_states[-2][:, 1:]
        embed = self.llama.get_input_embeddings()
        text_ids = torch.tensor([i for i in ids if i != IMAGE])
        text = embed(text_ids)
        parts = []
        if c.views != "local":
            parts.append(self.block(feats[0:1])[0])
        if c.views != "global":
            local = self.block(self.sampler(feats[1:]))                     # MLP path: (P, 144, H)
            cols, rows = grid
            local = local.view(rows, cols, 12, 12, -1).permute(0, 2, 1, 3, 4).reshape(-1, local.shape[-1])
            kept = list(range(len(local))) if c.topp >= 1.0 else torch_router(local, text, c.topp)
            local = local[kept]
            if c.views == "both":
                parts.append(embed(torch.tensor([SEPARATOR])))
            parts.append(local)
        image = torch.cat(parts)
        at = ids.index(IMAGE)
        seq = torch.cat([embed(torch.tensor(ids[:at])), image, embed(torch.tensor(ids[at + 1:]))])
        return self.llama(inputs_embeds=seq[None]).logits[0].numpy(), len(image)


def original_checkpoint(tmp_path, block, sampler, llama, clip, slime: SlimeConfig):
    main, clip_dir = tmp_path / "slime", tmp_path / "clip"
    os.makedirs(main)
    state = dict(llama.state_dict())
    state.update({f"model.mm_projector.{k}": v for k, v in block.state_dict().items()})
    state["model.mm_projector.mean"], state["model.mm_projector.std"] = torch.zeros(1), torch.ones(1)  # dead buffers
    state.update({f"model.sampler.post_qformer.{k}": v for k, v in sampler.state_dict().items()})
    # the tables in fp16, as released
    state = {k: (v.half() if k.endswith("pos_embed") else v).contiguous() for k, v in state.items()}
    save_file(state, main / "model.safetensors", metadata={"format": "pt"})
    cfg = dict(llama.config.to_dict(), model_type="llava_llama", mm_vision_tower="openai/clip-vit-large-patch14-336",
               mm_vision_select_layer=-2, mm_projector_type="gated", mm_resampler_type="cosine",
               mm_resampler_dim=144, mm_resampler_topp=slime.topp, mm_resampler_temp=1.0, seperator=SEPARATOR,
               mm_learnable_gated=slime.expert, mm_patch_merge_type="spatial", image_aspect_ratio="anyres",
               use_global_only=slime.views == "global", use_local_only=slime.views == "local")
    (main / "config.json").write_text(json.dumps(cfg))
    clip.save_pretrained(clip_dir)
    return main, clip_dir


@pytest.mark.parametrize("views, expert, topp", [("both", -1, 0.95), ("global", 1, 1.0), ("local", -1, 1.0)])
def test_original_slime_checkpoint_gives_the_reference_logits(tmp_path, views, expert, topp):
    slime = SlimeConfig(views=views, expert=expert, topp=topp, separator_id=SEPARATOR)
    clip, llama = tiny_clip(seed=31, image_size=TILE), tiny_llama(seed=32)
    torch.manual_seed(33)
    block, sampler = TorchGatedBlock(32, 32, 1, expert), TorchQueryResampler(12, 32, 1)
    randomise(block, 34)
    randomise(sampler, 35)
    with torch.no_grad():        # what the checkpoint stores (fp16 tables) is what both sides use
        for m in (block.attn, sampler):
            m.pos_embed.copy_(m.pos_embed.half().float())
    main, clip_dir = original_checkpoint(tmp_path, block, sampler, llama, clip, slime)
    out = tmp_path / "ours"
    assert convert_cli(["import", "--src", str(main), "--vision", str(clip_dir), "--out", str(out)]) == 0
    meta = load_meta(out)
    assert meta["model"]["projector_type"] == "gated"
    assert {k: meta["model"]["slime"][k] for k in ("views", "expert", "topp", "separator_id")} == dict(
        views=views, expert=expert, topp=topp, separator_id=SEPARATOR)
    model = VLM(vlm_config(dict(meta["model"], dtype="float32")))
    params = {"params": load_params(out)}
    ref = TorchSlime(clip, block, sampler, llama, slime)

    rng = np.random.default_rng(36)
    samples = []
    for size in ((500, 380), (300, 900)):   # 2x2 and 1x3 grids
        image = Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8))
        glob, tiles, grid = slime_tiles(image, TILE)
        views_px = np.stack([normalize(v) for v in [glob, *tiles]])
        ids = [1, *rng.integers(10, 120, 5).tolist(), IMAGE, *rng.integers(10, 120, 7).tolist()]
        samples.append((ids, views_px, grid))

    # ours: one batch, right-padded, image slots laid out by slime_feature_rows, tiles padded to max_tiles
    length = 40 + 577 + 7 * 144
    b = len(samples)
    ids_b = np.zeros((b, length), np.int32)
    map_b = np.full((b, length), -1, np.int32)
    valid_b = np.zeros((b, length), bool)
    pixels = np.zeros((b, slime.views_per_image, TILE, TILE, 3), np.float32)
    for row, (ids, views_px, grid) in enumerate(samples):
        rows = slime_feature_rows(slime, grid)
        at = ids.index(IMAGE)
        seq = ids[:at] + [0] * len(rows) + ids[at + 1:]
        ids_b[row, :len(seq)] = seq
        map_b[row, at:at + len(rows)] = rows
        valid_b[row, :len(seq)] = True
        n = slime.views_per_image
        pixels[row, :min(n, len(views_px))] = views_px[:n]
    positions = np.broadcast_to(np.arange(length), (b, length))
    logits, _ = model.apply(params, jnp.asarray(ids_b), jnp.asarray(valid_b), jnp.asarray(positions),
                            jnp.asarray(pixels), jnp.asarray(map_b))
    _, kept_valid, _ = model.apply(params, jnp.asarray(ids_b), jnp.asarray(valid_b), jnp.asarray(positions),
                                   jnp.asarray(pixels), jnp.asarray(map_b), method=VLM.embed_image_and_text)
    kept_valid = np.asarray(kept_valid)
    for row, (ids, views_px, grid) in enumerate(samples):
        want, n_image = ref.logits(ids, views_px[:slime.views_per_image], grid)
        got = np.asarray(logits[row])[kept_valid[row]]
        assert got.shape == want.shape, (got.shape, want.shape)
        assert rel_err(got, want) <= 1e-5
        if views == "both":    # the router did drop local tokens, and only local tokens
            assert n_image < 577 + 144 * grid[0] * grid[1]
            assert kept_valid[row, :ids.index(IMAGE) + 577].all()

    # export back to the original layout: the same tensors under the same names (the dead buffers are not ours)
    back = tmp_path / "back"
    assert convert_cli(["export", "--checkpoint", str(out), "--format", "llava_original", "--out", str(back)]) == 0
    exported = {k: a for k, a, _ in iter_tensors(str(back))}
    original = {k: a for k, a, _ in iter_tensors(str(main))}
    for k, a in original.items():
        if k.endswith(("mm_projector.mean", "mm_projector.std")):
            continue
        np.testing.assert_allclose(exported[k], np.asarray(a, np.float32), rtol=0, atol=0, err_msg=k)
    cfg = json.loads((back / "config.json").read_text())
    assert cfg["mm_projector_type"] == "gated" and cfg["seperator"] == SEPARATOR
    assert cfg["use_local_only"] == (views == "local") and cfg["mm_resampler_topp"] == topp


def test_stage1_files_mm_projector_and_sampler_bin_round_trip(tmp_path):
    """The original's stage-1 outputs: mm_projector.bin (the gated block) and sampler.bin (the local compressor)."""
    import flax.linen as nn
    import jax

    from uhd_jax.config_loading import load_config
    from uhd_jax.models.vlm import init_fn
    from uhd_jax.train.checkpoints import save_params
    from uhd_jax.train.param_tree import flatten

    c = load_config("configs/slime.py:tiny")
    c.model.slime.separator_id = SEPARATOR
    params = nn.meta.unbox(jax.jit(init_fn(vlm_config(c.model)))(jax.random.PRNGKey(0))["params"])
    save_params(str(tmp_path / "ours"), params, {"model": c.model.to_dict()})
    assert convert_cli(["export", "--checkpoint", str(tmp_path / "ours"), "--format", "mm_projector",
                        "--out", str(tmp_path / "stage1")]) == 0
    proj = {k for k, _, _ in iter_tensors(str(tmp_path / "stage1" / "mm_projector.bin"))}
    sampler = {k for k, _, _ in iter_tensors(str(tmp_path / "stage1" / "sampler.bin"))}
    assert all(k.startswith("model.mm_projector.") for k in proj) and "model.mm_projector.w_gate" in proj
    assert all(k.startswith("model.sampler.post_qformer.") for k in sampler) and len(sampler) == 12
    assert convert_cli(["import", "--src", str(tmp_path / "stage1" / "mm_projector.bin"), "--projector",
                        str(tmp_path / "stage1" / "sampler.bin"), "--config", "configs/slime.py:tiny",
                        "--out", str(tmp_path / "back")]) == 0
    back = flatten(load_params(str(tmp_path / "back")))
    want = {k: v for k, v in flatten(params).items() if k.startswith("projector/")}
    assert set(back) == set(want)
    for k, v in want.items():
        np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(v), err_msg=k)
