"""Logit check of a converted checkpoint against the PyTorch model it came from (or was exported to).

Builds both models in float32 on the CPU, feeds them the same random prompt (and image), and returns the relative
error max|ours - torch| / max|torch| over real positions. Needs memory for two fp32 copies of the model.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from uhd_jax.convert import hf_configs, tables
from uhd_jax.convert.torch_io import list_keys, read_config
from uhd_jax.models.config import llm_config, vit_config, vlm_config
from uhd_jax.models.llama import Llama, positions_from_mask
from uhd_jax.models.vit import VisionTransformer
from uhd_jax.models.vlm import VLM
from uhd_jax.train.checkpoints import load_meta, load_params


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# Fields that do not change the logits compared here (positions past seq_len, rows past the ids we feed, how we run).
_NOT_COMPARED = {"max_position_embeddings", "vocab_size", "dtype", "param_dtype", "attention_impl", "remat_policy",
                 "scan_layers"}


def _described(model: dict, towers) -> dict:
    """The model's fields that decide the logits, with the module defaults filled in, projector first."""
    out = {}
    if "projector_type" in towers:
        out["projector_type"] = model.get("projector_type", "mlp2x_gelu")
    for tower, build in (("vision", vit_config), ("llm", llm_config)):
        if tower in towers:
            fields = dataclasses.asdict(build({tower: model[tower]}))
            out[tower] = {k: v for k, v in fields.items() if k not in _NOT_COMPARED}
    return out


def check_same_model(model: dict, torch_model: dict, checkpoint: str, torch_dir: str, layout: str):
    """One line naming the first field where the checkpoint's model and the torch directory's config.json differ
    (comparing the logits of two different models fails later with a shape error that says nothing)."""
    towers = [k for k in ("projector_type", "vision", "llm") if k in torch_model]
    missing = [t for t in towers if t != "projector_type" and t not in model]
    if missing:
        raise ValueError(f"{checkpoint} has no {missing[0]} tower, which the {layout} model in {torch_dir} has")
    ours, theirs = _described(model, towers), _described(torch_model, towers)
    if layout == "hf_clip":   # which hidden state we compare is ours to choose, not part of a CLIPVisionConfig
        for side in (ours, theirs):
            side["vision"].pop("select_layer"), side["vision"].pop("select_feature")
    for key, value in theirs.items():
        pairs = ([(f"{key}.{k}", ours[key][k], v) for k, v in value.items()] if isinstance(value, dict)
                 else [(key, ours[key], value)])
        for field, a, b in pairs:
            if a != b:
                raise ValueError(f"{checkpoint} and {torch_dir} are different models: {field} is {a!r} in the "
                                 f"checkpoint but {b!r} in {torch_dir}/config.json ({layout}); verify compares a "
                                 f"checkpoint with the transformers model it was exported to or imported from")


def compare_logits(checkpoint: str, torch_dir: str, seq_len: int = 24, seed: int = 0) -> float:
    import torch
    import transformers

    meta = load_meta(checkpoint)
    model = dict(meta["model"], dtype="float32")
    layout = tables.detect_layout(list_keys(torch_dir))
    if layout not in ("llava_hf", "hf_llama", "hf_clip"):
        raise ValueError(f"verify compares against transformers models (llava_hf, hf_llama, hf_clip); {torch_dir} "
                         f"is {layout}: export it with --format llava_hf first")
    cfg = read_config(torch_dir)
    if cfg is None:
        raise ValueError(f"{torch_dir} has no config.json; verify needs the transformers model directory")
    theirs = {"llava_hf": lambda: hf_configs.model_from_llava_hf(cfg),
              "hf_llama": lambda: {"llm": hf_configs.llm_from_hf(cfg)},
              "hf_clip": lambda: {"vision": hf_configs.vision_from_hf(cfg)}}[layout]()
    check_same_model(model, theirs, checkpoint, torch_dir, layout)
    params = load_params(checkpoint)
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
        ref = transformers.AutoModelForCausalLM.from_pretrained(torch_dir, dtype=torch.float32).eval()   # or Qwen2
        with torch.no_grad():
            theirs = ref(input_ids=torch.from_numpy(ids)).logits.numpy()
        return _rel(ours, theirs)
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


