"""Logit check of a converted checkpoint against the PyTorch model it came from (or was exported to).

Builds both models in float32 on the CPU, feeds them the same random prompt (and image), and returns the relative
error max|ours - torch| / max|torch| over real positions. Needs memory for two fp32 copies of the model.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from tools.convert_torch import tables
from tools.convert_torch.torch_io import list_keys
from uhd_jax.models.config import llm_config, vit_config, vlm_config
from uhd_jax.models.llama import Llama, positions_from_mask
from uhd_jax.models.vit import VisionTransformer
from uhd_jax.models.vlm import VLM
from uhd_jax.train.checkpoints import load_meta, load_params


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def compare_logits(checkpoint: str, torch_dir: str, seq_len: int = 24, seed: int = 0) -> float:
    import torch
    import transformers

    meta = load_meta(checkpoint)
    model = dict(meta["model"], dtype="float32")
    params = load_params(checkpoint)
    layout = tables.detect_layout(list_keys(torch_dir))
    rng = np.random.default_rng(seed)
    if layout == "hf_clip":
        cfg = vit_config(model)
        pixels = rng.normal(size=(1, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
        ours = VisionTransformer(cfg).apply({"params": params["vision"]}, jnp.asarray(pixels))
        ref = transformers.CLIPVisionModel.from_pretrained(torch_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            out = ref(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True)
        theirs = out.hidden_states[cfg.select_layer]
        return _rel(ours, theirs[:, 1:] if cfg.select_feature == "patch" else theirs)
    vocab = model["llm"]["vocab_size"]
    if layout == "hf_llama":
        cfg = llm_config(model)
        ids = rng.integers(3, vocab, size=(1, seq_len))
        llm = Llama(cfg)
        valid = jnp.ones(ids.shape, bool)
        embeds = llm.apply({"params": params["llm"]}, jnp.asarray(ids), method=Llama.embed)
        ours, _ = llm.apply({"params": params["llm"]}, embeds, positions_from_mask(valid), valid)
        ref = transformers.LlamaForCausalLM.from_pretrained(torch_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            theirs = ref(input_ids=torch.from_numpy(ids)).logits.numpy()
        return _rel(ours, theirs)
    if layout != "llava_hf":
        raise ValueError(f"verify compares against transformers models (llava_hf, hf_llama, hf_clip); {torch_dir} "
                         f"is {layout}: export it with --format llava_hf first")
    ref = transformers.LlavaForConditionalGeneration.from_pretrained(torch_dir, dtype=torch.float32).eval()
    cfg = vlm_config(model)
    image_token = ref.config.image_token_index
    n = cfg.tokens_per_image
    text = rng.integers(3, min(vocab, image_token), size=seq_len)
    ids = np.concatenate([[1], text[:4], [image_token] * n, text[4:]])[None]
    image_map = np.where(ids == image_token, np.cumsum(ids == image_token, 1) - 1, -1).astype(np.int32)
    pixels = rng.normal(size=(1, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
    valid = np.ones(ids.shape, bool)
    ours, _ = VLM(cfg).apply({"params": params}, jnp.asarray(ids), jnp.asarray(valid),
                             jnp.asarray(np.arange(ids.shape[1])[None]), jnp.asarray(pixels[:, None]),
                             jnp.asarray(image_map))
    with torch.no_grad():
        theirs = ref(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))
                     ).logits.numpy()
    return _rel(np.asarray(ours)[..., :vocab], theirs[..., :vocab])


