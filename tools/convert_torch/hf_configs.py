"""HF / original-repo config.json <-> our `config.model` sections.

Reads both the transformers-4 (`rope_theta`, `rope_scaling`) and transformers-5 (`rope_parameters`) spellings; writes
through transformers' own config classes so that what we export is what the installed transformers expects.
"""
from __future__ import annotations


_CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, patch_size=14,
                   image_size=336, layer_norm_eps=1e-5, hidden_act="quick_gelu")


def vision_from_hf(cfg: dict, select_layer: int = -2, select_feature: str = "patch") -> dict:
    cfg = cfg.get("vision_config", cfg)  # a full CLIPConfig nests the vision tower
    return dict(hidden_size=cfg.get("hidden_size", 768), intermediate_size=cfg.get("intermediate_size", 3072),
                num_layers=cfg.get("num_hidden_layers", 12), num_heads=cfg.get("num_attention_heads", 12),
                patch_size=cfg.get("patch_size", 32), image_size=cfg.get("image_size", 224),
                num_channels=cfg.get("num_channels", 3), layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
                hidden_act=cfg.get("hidden_act", "quick_gelu"), select_layer=select_layer,
                select_feature=select_feature)


def vision_from_tower_name(name: str | None) -> dict | None:
    """Original LLaVA configs name their tower (`mm_vision_tower`) instead of describing it."""
    if name and "clip-vit-large-patch14-336" in name:
        return dict(_CLIP_L_336)
    return None


def llm_from_hf(cfg: dict) -> dict:
    if cfg.get("tie_word_embeddings"):
        raise ValueError("checkpoint config has tie_word_embeddings=true; uhd-jax Llama keeps an untied lm_head "
                         "(every LLaVA-family LLM is untied)")
    rope = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = rope.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    scaling = None
    if kind == "llama3":
        src = rope if rope.get("rope_type") == "llama3" else legacy
        scaling = {k: src[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                       "original_max_position_embeddings")}
    elif kind != "default":
        raise ValueError(f"rope type {kind!r} is not supported (supported: default, llama3)")
    if cfg.get("use_sliding_window"):
        raise ValueError("sliding-window attention (use_sliding_window=true) is not supported; the released Qwen2 "
                         "LLaVA-UHD v2 checkpoints do not use it")
    heads = cfg["num_attention_heads"]
    out = dict(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
               intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"], num_heads=heads,
               num_kv_heads=cfg.get("num_key_value_heads") or heads, rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
               rope_theta=float(theta), rope_scaling=scaling,
               # Qwen2 configs carry no attention_bias key: its q/k/v projections always have biases
               attention_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
               max_position_embeddings=cfg.get("max_position_embeddings", 4096))
    head_dim = cfg.get("head_dim")
    if head_dim and head_dim != cfg["hidden_size"] // heads:
        out["head_dim"] = head_dim
    return out


def hf_meta(cfg: dict) -> dict:
    """Token ids the HF side needs on export but our model does not use."""
    text = cfg.get("text_config", cfg)
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    meta = {k: text.get(k) for k in keys if text.get(k) is not None}
    for k in ("image_token_index", "image_token_id"):
        if cfg.get(k) is not None:
            meta["image_token_index"] = cfg[k]
    return meta


def model_from_llava_hf(cfg: dict) -> dict:
    strategy = cfg.get("vision_feature_select_strategy", "default")
    layer = cfg.get("vision_feature_layer", -2)
    if isinstance(layer, (list, tuple)):
        raise ValueError(f"vision_feature_layer={layer}: multi-layer features are not part of the LLaVA-1.5 family")
    act = cfg.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"projector_hidden_act={act!r}: only the exact-GELU mlp2x_gelu projector is supported")
    return dict(vision=vision_from_hf(cfg["vision_config"], layer, "patch" if strategy == "default" else "cls_patch"),
                llm=llm_from_hf(cfg["text_config"]), projector_type="mlp2x_gelu")


def model_from_llava_original(cfg: dict, vision_cfg: dict | None) -> dict:
    layer = cfg.get("mm_vision_select_layer", -2)
    feature = cfg.get("mm_vision_select_feature", "patch")
    if vision_cfg is not None:
        vision = vision_from_hf(vision_cfg, layer, feature)
    else:
        vision = vision_from_tower_name(cfg.get("mm_vision_tower"))
        if vision is None:
            raise ValueError(f"cannot tell the vision tower of this checkpoint (mm_vision_tower="
                             f"{cfg.get('mm_vision_tower')!r}); pass --vision with the CLIP directory")
        vision.update(select_layer=layer, select_feature=feature)
    model = dict(vision=vision, llm=llm_from_hf(cfg), projector_type=cfg.get("mm_projector_type", "linear"))
    if model["projector_type"] == "gated":
        model["slime"] = slime_from_original(cfg)
    return model


def slime_from_original(cfg: dict) -> dict:
    """SliME's mm_* keys (spec §C) -> `config.model.slime`."""
    if cfg.get("mm_resampler_type", "cosine") != "cosine" or cfg.get("mm_patch_merge_type", "spatial") != "spatial":
        raise ValueError(f"SliME checkpoint with mm_resampler_type={cfg.get('mm_resampler_type')!r}, "
                         f"mm_patch_merge_type={cfg.get('mm_patch_merge_type')!r}: only the released 'cosine' router "
                         f"and 'spatial' merge are supported")
    dim = int(cfg.get("mm_resampler_dim", 144))
    local_grid = int(round(dim ** 0.5))
    if local_grid * local_grid != dim:
        raise ValueError(f"mm_resampler_dim={dim} is not a square number of local queries")
    views = "global" if cfg.get("use_global_only") else "local" if cfg.get("use_local_only") else "both"
    return dict(views=views, expert=int(cfg.get("mm_learnable_gated", -1)),
                topp=float(cfg.get("mm_resampler_topp", 0.95)), temperature=float(cfg.get("mm_resampler_temp", 1.0)),
                separator_id=int(cfg.get("seperator", 1919)), local_grid=local_grid)


def slime_to_original(slime: dict) -> dict:
    return dict(mm_resampler_type="cosine", mm_resampler_dim=int(slime.get("local_grid", 12)) ** 2,
                mm_resampler_topp=slime.get("topp", 0.95), mm_resampler_temp=slime.get("temperature", 1.0),
                seperator=slime.get("separator_id", 1919), mm_learnable_gated=slime.get("expert", -1),
                use_global_only=slime.get("views") == "global", use_local_only=slime.get("views") == "local",
                mm_patch_merge_type="spatial", image_aspect_ratio="anyres")


# ---- export ---------------------------------------------------------------------------------------------------

def _hf_act(name: str) -> str:
    return {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[name]


def clip_vision_config(vision: dict):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
                            num_hidden_layers=vision["num_layers"], num_attention_heads=vision["num_heads"],
                            patch_size=vision["patch_size"], image_size=vision["image_size"],
                            num_channels=vision.get("num_channels", 3), layer_norm_eps=vision["layer_norm_eps"],
                            hidden_act=_hf_act(vision["hidden_act"]))


def llama_config(llm: dict, meta: dict):
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": llm["rope_theta"]}
    if llm.get("rope_scaling"):
        rope = {"rope_type": "llama3", "rope_theta": llm["rope_theta"], **llm["rope_scaling"]}
    kw = dict(vocab_size=llm["vocab_size"], hidden_size=llm["hidden_size"],
              intermediate_size=llm["intermediate_size"], num_hidden_layers=llm["num_layers"],
              num_attention_heads=llm["num_heads"], num_key_value_heads=llm["num_kv_heads"],
              rms_norm_eps=llm["rms_norm_eps"], rope_parameters=rope, attention_bias=llm.get("attention_bias", False),
              max_position_embeddings=llm["max_position_embeddings"], tie_word_embeddings=False,
              **{k: v for k, v in meta.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    if llm.get("head_dim"):
        kw["head_dim"] = llm["head_dim"]
    return LlamaConfig(**kw)


def llava_config(model: dict, meta: dict):
    from transformers import LlavaConfig

    if model["projector_type"] != "mlp2x_gelu":
        raise ValueError(f"LlavaForConditionalGeneration has only the mlp2x_gelu projector; this model uses "
                         f"{model['projector_type']!r}: export with --format llava_original instead")
    vision = model["vision"]
    return LlavaConfig(vision_config=clip_vision_config(vision), text_config=llama_config(model["llm"], meta),
                       image_token_index=meta["image_token_index"], projector_hidden_act="gelu",
                       vision_feature_layer=vision["select_layer"],
                       vision_feature_select_strategy="default" if vision["select_feature"] == "patch" else "full",
                       image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2)


def llava_original_config(model: dict, meta: dict) -> dict:
    """Original LLaVA `config.json`: Llama keys at the top level plus the mm_* keys."""
    cfg = llama_config(model["llm"], meta).to_dict()
    cfg.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama",
               mm_hidden_size=model["vision"]["hidden_size"], mm_projector_type=model["projector_type"],
               mm_vision_select_layer=model["vision"]["select_layer"],
               mm_vision_select_feature=model["vision"]["select_feature"],
               mm_vision_tower="openai/clip-vit-large-patch14-336", use_mm_proj=True, mm_patch_merge_type="flat",
               mm_use_im_start_end=False, mm_use_im_patch_token=False)
    if model["projector_type"] == "gated":
        cfg.update(slime_to_original(dict(model.get("slime") or {})))
    return cfg
