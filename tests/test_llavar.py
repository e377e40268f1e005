"""LLaVAR (spec §D): an original-layout checkpoint (linear projector, three extra token rows) gives the reference
logits and exports back unchanged; samples wrap the image in <im_start>/<im_end>; stage 1 grows the vocabulary with
mean rows and trains only the projector and the new start/end rows."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer

from tests.config_helpers import on_synthetic_data
from tests.torch_helpers import random_pixels, rel_err, tiny_clip, tiny_llama, to_nchw
from uhd_jax.convert.cli import main as convert_cli
from uhd_jax.convert.torch_io import iter_tensors
from uhd_jax.data.pipeline import Source
from uhd_jax.models.config import vlm_config
from uhd_jax.models.vlm import VLM, init_fn
from uhd_jax.train.checkpoints import load_meta, load_params, save_params
from uhd_jax.train.param_tree import flatten, unflatten
from uhd_jax.train.trainer import model_for_stage, preparer_factory, run_stage

IM_PATCH, IM_START, IM_END = 125, 126, 127  # the three tokens LLaVAR adds at the end of the vocabulary


def torch_llavar_logits(clip, proj, llama, ids, pixels):
    """LLaVAR's forward (LLaVA v1 code): CLIP layer -2 without CLS -> Linear -> replace the <im_patch> embeddings."""
    with torch.no_grad():
        feats = clip(pixel_values=to_nchw(pixels), output_hidden_states=True).hidden_states[-2][:, 1:]
        feats = proj(feats)
        embeds = llama.get_input_embeddings()(torch.from_numpy(ids)).clone()
        for b in range(ids.shape[0]):
            start = int(np.flatnonzero(ids[b] == IM_START)[0])
            assert ids[b, start + feats.shape[1] + 1] == IM_END  # the original checks this too
            embeds[b, start + 1:start + 1 + feats.shape[1]] = feats[b]
        return llama(inputs_embeds=embeds).logits.numpy()


def test_llavar_original_checkpoint_matches_torch_reference(tmp_path):
    clip, llama = tiny_clip(seed=21), tiny_llama(seed=22)
    torch.manual_seed(23)
    proj = torch.nn.Linear(32, 32)
    main, clip_dir = tmp_path / "llavar", tmp_path / "clip"
    os.makedirs(main)
    state = {("model." + k[len("model."):] if k.startswith("model.") else k): v for k, v in llama.state_dict().items()}
    state.update({"model.mm_projector.weight": proj.weight.detach(), "model.mm_projector.bias": proj.bias.detach()})
    save_file({k: v.contiguous() for k, v in state.items()}, main / "model.safetensors", metadata={"format": "pt"})
    cfg = dict(llama.config.to_dict(), model_type="llava", mm_vision_tower="openai/clip-vit-large-patch14-336",
               mm_vision_select_layer=-2, mm_use_im_start_end=True, mm_hidden_size=32)  # v1 configs: no projector type
    (main / "config.json").write_text(json.dumps(cfg))
    clip.save_pretrained(clip_dir)
    out = tmp_path / "ours"
    assert convert_cli(["import", "--src", str(main), "--layout", "llava_original", "--vision", str(clip_dir),
                        "--out", str(out)]) == 0
    meta = load_meta(out)
    assert meta["model"]["projector_type"] == "linear"
    model = VLM(vlm_config(dict(meta["model"], dtype="float32")))
    params = {"params": load_params(out)}

    rng = np.random.default_rng(5)
    ids = np.concatenate([[1], rng.integers(3, 120, 4), [IM_START], [IM_PATCH] * 16, [IM_END],
                          rng.integers(3, 120, 6)])[None].repeat(2, 0).astype(np.int64)
    ids[1, 1:5] = rng.integers(3, 120, 4)
    pixels = random_pixels(2, 56, 56, seed=6)
    image_map = np.where(ids == IM_PATCH, np.cumsum(ids == IM_PATCH, 1) - 1, -1).astype(np.int32)
    valid = np.ones(ids.shape, bool)
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    logits, _ = model.apply(params, jnp.asarray(ids), jnp.asarray(valid), jnp.asarray(positions),
                            jnp.asarray(pixels[:, None]), jnp.asarray(image_map))
    assert rel_err(logits, torch_llavar_logits(clip, proj, llama, ids, pixels)) <= 1e-5

    # export back to the original layout: every tensor, the three image-token rows included, comes back unchanged
    back = tmp_path / "back"
    assert convert_cli(["export", "--checkpoint", str(out), "--format", "llava_original", "--out", str(back)]) == 0
    exported = {k: a for k, a, _ in iter_tensors(str(back))}
    for k, v in state.items():
        np.testing.assert_array_equal(exported[k], v.numpy(), err_msg=k)
    assert exported["model.embed_tokens.weight"].shape[0] == 128   # 125 + <im_patch>, <im_start>, <im_end>


def tiny_llavar(data):
    return on_synthetic_data("configs/llavar.py:tiny", data, num_steps=1)


def test_llavar_samples_wrap_the_image_in_start_and_end_tokens(synthetic_data):
    c = tiny_llavar(synthetic_data)
    cfg = model_for_stage(c, c.stages.sft)
    prep = preparer_factory(c, c.stages.sft, cfg)(Source(synthetic_data["train"]["sft"], synthetic_data["images"]))
    tok = prep.tokenizer
    base = AutoTokenizer.from_pretrained(synthetic_data["tokenizer"])
    patch, start, end = tok.convert_tokens_to_ids(["<im_patch>", "<im_start>", "<im_end>"])
    assert (patch, start, end) == (len(base), len(base) + 1, len(base) + 2)   # appended in the original's order
    sample = json.load(open(synthetic_data["train"]["sft"]))[0]
    ex = prep((0, sample))
    ids, image_map = ex["ids"], ex["image_map"]
    slots = np.flatnonzero(image_map >= 0)
    assert len(slots) == cfg.tokens_per_image and (np.diff(slots) == 1).all()
    assert ids[slots[0] - 1] == start and ids[slots[-1] + 1] == end and (ids[slots] == patch).all()
    assert not ex["learned"][slots[0] - 1:slots[-1] + 2].any()
    text = tok.decode(ids[:slots[0] - 1])
    assert "trained by UW Madison WAIV Lab.You are able" in text    # the original system prompt, spaces missing


def test_llavar_stage1_grows_the_vocabulary_and_trains_only_the_new_rows_and_projector(synthetic_data, tmp_path):
    c = tiny_llavar(synthetic_data)
    base = len(AutoTokenizer.from_pretrained(synthetic_data["tokenizer"]))
    # an init checkpoint with the base tokenizer's vocabulary (as a converted Vicuna has 32000 rows)
    cfg = model_for_stage(c, c.stages.pretrain)
    init = {k: np.asarray(v) for k, v in flatten(nn.meta.unbox(
        jax.jit(init_fn(cfg))(jax.random.PRNGKey(7))["params"])).items()}
    init["llm/embed_tokens/embedding"] = init["llm/embed_tokens/embedding"][:base]
    init["llm/lm_head"] = init["llm/lm_head"][:, :base]
    model = dict(c.model.to_dict(), llm=dict(c.model.llm.to_dict(), vocab_size=base))
    save_params(str(tmp_path / "init"), unflatten(init), {"model": model})
    c.stages.pretrain.init_checkpoints = [str(tmp_path / "init")]
    res = run_stage(c, "pretrain", str(tmp_path / "run"))
    final = {k: np.asarray(v) for k, v in flatten(load_params(res.final_dir)).items()}

    emb, head = final["llm/embed_tokens/embedding"], final["llm/lm_head"]
    old_emb, old_head = init["llm/embed_tokens/embedding"], init["llm/lm_head"]
    np.testing.assert_array_equal(emb[:base], old_emb)                       # old rows: bit-identical
    np.testing.assert_array_equal(head[:, :base], old_head)
    mean_emb = old_emb.mean(0)
    patch, start, end = base, base + 1, base + 2
    for row in [patch] + list(range(end + 1, 640)):                          # new rows that do not learn: the mean
        np.testing.assert_allclose(emb[row], mean_emb, rtol=1e-6, atol=1e-7)
    for row in (start, end):                                                 # <im_start>, <im_end>: moved off it
        assert np.abs(emb[row] - mean_emb).max() > 1e-5
    np.testing.assert_allclose(head[:, base:], np.repeat(old_head.mean(1, keepdims=True), 640 - base, 1),
                               rtol=1e-6, atol=1e-7)                         # lm_head frozen, grown with the mean
    assert not np.array_equal(final["projector/dense_0/kernel"], init["projector/dense_0/kernel"])
    for k in final:
        if k.startswith(("vision/", "llm/")) and k not in ("llm/embed_tokens/embedding", "llm/lm_head"):
            np.testing.assert_array_equal(final[k], init[k], err_msg=k)
