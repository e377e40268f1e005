"""LLaVAR: linear projector and <im_start> + image features + <im_end>, from an original-layout checkpoint."""
import json
import os

import jax.numpy as jnp
import numpy as np
import torch
from safetensors.torch import save_file

from tests.torch_helpers import random_pixels, rel_err, tiny_clip, tiny_llama, to_nchw
from tools.convert_torch.__main__ import main as convert_cli
from uhd_jax.models.config import vlm_config
from uhd_jax.models.vlm import VLM
from uhd_jax.train.checkpoints import load_meta, load_params

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
