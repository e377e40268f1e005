"""HF / original-repo config.json <-> our `config.model` sections.

Reads both the transformers-4 (`rope_theta`, `rope_scaling`) and transformers-5 (`rope_parameters`) spellings; writes
through transformers' own config classes so that what we export is what the installed transformers expects.
"""
from __future__ import annotations

import json
import os
import re

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
    """Original LLaVA configs name their tower (`mm_vision_tower`) instead of describing it: a hub name, or a local
    CLIP directory (our llava_original exports of towers other than CLIP-L/336 write one beside the weights)."""
    if name and os.path.isfile(os.path.join(name, "config.json")):
        with open(os.path.join(name, "config.json")) as f:
            return vision_from_hf(json.load(f))
    if name and "clip-vit-large-patch14-336" in name:
        return dict(_CLIP_L_336)
    return None


def is_clip_l_336(vision: dict) -> bool:
    return all(vision.get(k) == v for k, v in _CLIP_L_336.items())


def _is_qwen2(cfg: dict) -> bool:
    # LLaVA-UHD v2's Qwen2 checkpoints say model_type 'llava_qwen' (LlavaQwenForCausalLM), plain Qwen2 says 'qwen2'
    return cfg.get("model_type") in ("qwen2", "llava_qwen") or any(
        "Qwen2" in a for a in cfg.get("architectures") or ())


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
               attention_bias=bool(cfg.get("attention_bias", _is_qwen2(cfg))),
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


# mm_projector_type of the original repos -> ours, for the v1 resampler: v1-ECCV writes 'adapt_spatial_resampler',
# the v2 repos select their copy of it as 'adapt_spatial_resampler_v1' (144 queries) or 'uhd_v1_query64' (64).
UHD_V1_PROJECTORS = {"adapt_spatial_resampler": "adapt_spatial_resampler",
                     "adapt_spatial_resampler_v1": "adapt_spatial_resampler", "uhd_v1_query64": "uhd_v1_query64"}
# Our names with no original checkpoint (v1-arXiv's builder ignores the key; the 64-query v2 is ours): they come back
# from our own llava_original exports.
OWN_PROJECTORS = {"arxiv_resampler": "uhd_v1", "uhd_v2_query64": "uhd_v2"}


def original_family(cfg: dict) -> tuple[str, dict]:
    """(family, projector part of `config.model`) from the mm_* keys an original repo writes into config.json.

    LLaVA-UHD v2 is 'adapt_spatial_resampler_v2' (v2-head) or 'adapt_spatial_resampler' with feature_mode
    'featup_muti_res' (v2-dec2024), its levels in feature_scale_mask (code default 7); v1 is 'adapt_spatial_resampler'
    (feature_mode absent or 'uhd_v1') or the v2 repos' 'adapt_spatial_resampler_v1' / 'uhd_v1_query64'; SliME is
    'gated'; LLaVAR (LLaVA v1 code) writes no mm_projector_type, a Linear projector and mm_use_im_start_end true;
    LLaVA-1.5 is 'mlp2x_gelu'."""
    ptype = cfg.get("mm_projector_type")
    feature_mode = cfg.get("feature_mode")
    if ptype in ("adapt_spatial_resampler_v2", "uhd_v2_query64") or (ptype == "adapt_spatial_resampler"
                                                                      and feature_mode == "featup_muti_res"):
        mask = int(cfg.get("feature_scale_mask", 7))
        if mask & 8 or not mask & 7:
            raise ValueError(f"feature_scale_mask={mask}: only the 1x/2x/4x levels exist (bits 1, 2, 4; the "
                             f"original's 8x stack cannot run either)")
        family = "uhd_v2"
        projector = dict(projector_type=ptype if ptype == "uhd_v2_query64" else "adapt_spatial_resampler_v2",
                         feature_scale_mask=mask)
    elif ptype == "arxiv_resampler":
        family, projector = "uhd_v1", dict(projector_type=ptype)
    elif ptype in UHD_V1_PROJECTORS:
        if feature_mode not in (None, "uhd_v1"):
            raise ValueError(f"feature_mode={feature_mode!r} with mm_projector_type={ptype!r}: known feature modes "
                             f"are 'uhd_v1' and 'featup_muti_res'")
        family, projector = "uhd_v1", dict(projector_type=UHD_V1_PROJECTORS[ptype])
    elif ptype == "gated":
        family, projector = "slime", dict(projector_type="gated", slime=slime_from_original(cfg))
    elif ptype in (None, "linear") and cfg.get("mm_use_im_start_end"):
        family, projector = "llavar", dict(projector_type="linear")
    elif ptype in (None, "linear") or re.fullmatch(r"mlp\d+x_gelu", ptype):
        family, projector = "llava15", dict(projector_type=ptype or "linear")
    else:
        raise ValueError(f"mm_projector_type={ptype!r} is not a projector of LLaVA-1.5, LLaVAR, SliME or LLaVA-UHD "
                         f"v1/v2 (known: linear, mlp<N>x_gelu, gated, {', '.join(UHD_V1_PROJECTORS)}, "
                         f"adapt_spatial_resampler_v2, and ours: {', '.join(OWN_PROJECTORS)})")
    mode = cfg.get("model_mode")
    if mode in ("uhd_v1", "uhd_v2") and mode != family:
        raise ValueError(f"model_mode={mode!r} does not go with mm_projector_type={ptype!r}")
    if family in ("llava15", "llavar") and (cfg.get("image_aspect_ratio") == "anyres"
                                            or str(cfg.get("mm_patch_merge_type", "flat")).startswith("spatial")):
        raise ValueError(f"image_aspect_ratio={cfg.get('image_aspect_ratio')!r}, mm_patch_merge_type="
                         f"{cfg.get('mm_patch_merge_type')!r}: LLaVA-NeXT's anyres is not supported (LLaVA-1.5 "
                         f"checkpoints say 'pad' / 'flat')")
    return family, projector


def model_from_llava_original(cfg: dict, vision_cfg: dict | None) -> tuple[dict, str]:
    """(`config.model`, family) of an original-repo checkpoint from its config.json (and --vision's config.json)."""
    family, projector = original_family(cfg)
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
    if cfg.get("mm_hidden_size") not in (None, vision["hidden_size"]):
        raise ValueError(f"mm_hidden_size={cfg['mm_hidden_size']} but the vision tower's width is "
                         f"{vision['hidden_size']}: pass --vision with the CLIP directory the checkpoint was trained "
                         f"with")
    return dict(vision=vision, llm=llm_from_hf(cfg), **projector), family


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


def _rope_parameters(llm: dict) -> dict:
    if llm.get("rope_scaling"):
        return {"rope_type": "llama3", "rope_theta": llm["rope_theta"], **llm["rope_scaling"]}
    return {"rope_type": "default", "rope_theta": llm["rope_theta"]}


def llm_config(llm: dict, meta: dict):
    """LlamaConfig, or Qwen2Config for an LLM with q/k/v biases: the only such LLM we hold is Qwen2, and a Llama with
    attention_bias would also expect an o_proj bias that Qwen2 does not have."""
    from transformers import LlamaConfig, Qwen2Config

    kw = dict(vocab_size=llm["vocab_size"], hidden_size=llm["hidden_size"],
              intermediate_size=llm["intermediate_size"], num_hidden_layers=llm["num_layers"],
              num_attention_heads=llm["num_heads"], num_key_value_heads=llm["num_kv_heads"],
              rms_norm_eps=llm["rms_norm_eps"], rope_parameters=_rope_parameters(llm),
              max_position_embeddings=llm["max_position_embeddings"], tie_word_embeddings=False,
              **{k: v for k, v in meta.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    if llm.get("head_dim"):
        kw["head_dim"] = llm["head_dim"]
    if llm.get("attention_bias"):
        return Qwen2Config(use_sliding_window=False, **kw)
    return LlamaConfig(attention_bias=False, **kw)


def with_legacy_rope(cfg: dict, llm: dict) -> dict:
    """transformers 5 writes RoPE only as `rope_parameters`; transformers 4 reads top-level `rope_theta` and
    `rope_scaling` and silently takes theta 10000 without them (wrong for Llama-3's 500000 and Qwen2's 1e6). Write
    both spellings, so that either version reads the same RoPE."""
    cfg["rope_theta"] = float(llm["rope_theta"])
    cfg["rope_scaling"] = {"rope_type": "llama3", **llm["rope_scaling"]} if llm.get("rope_scaling") else None
    return cfg


def llm_dict(llm: dict, meta: dict) -> dict:
    """hf_llama's config.json: LlamaForCausalLM (Qwen2ForCausalLM for Qwen2)."""
    cfg = with_legacy_rope(llm_config(llm, meta).to_dict(), llm)
    cfg["architectures"] = ["Qwen2ForCausalLM" if llm.get("attention_bias") else "LlamaForCausalLM"]
    return cfg


def check_llava_hf_projector(projector_type: str):
    if projector_type != "mlp2x_gelu":
        raise ValueError(f"LlavaForConditionalGeneration has only the mlp2x_gelu projector; this model uses "
                         f"{projector_type!r}: export with --format llava_original instead")


def llava_config(model: dict, meta: dict):
    from transformers import LlavaConfig

    check_llava_hf_projector(model["projector_type"])
    vision = model["vision"]
    return LlavaConfig(vision_config=clip_vision_config(vision), text_config=llm_config(model["llm"], meta),
                       image_token_index=meta["image_token_index"], projector_hidden_act="gelu",
                       vision_feature_layer=vision["select_layer"],
                       vision_feature_select_strategy=feature_select_strategy(vision),
                       image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2
                       + (vision["select_feature"] != "patch"))


def feature_select_strategy(vision: dict) -> str:
    return "default" if vision["select_feature"] == "patch" else "full"


def llava_dict(model: dict, meta: dict) -> dict:
    """llava_hf's config.json, its text_config with both RoPE spellings."""
    cfg = llava_config(model, meta).to_dict()
    with_legacy_rope(cfg["text_config"], model["llm"])
    cfg["architectures"] = ["LlavaForConditionalGeneration"]
    if meta.get("pad_token_id") is not None:   # where released llava-hf configs have it too
        cfg["pad_token_id"] = meta["pad_token_id"]
    return cfg


# The original trainings' fixed arguments (LLaVA-1.5's finetune.sh and the forks'), as their config.json records them.
ORIGINAL_TRAINING_KEYS = dict(use_mm_proj=True, tune_mm_mlp_adapter=False, freeze_mm_mlp_adapter=False,
                              tokenizer_padding_side="right")


def llava_original_config(model: dict, meta: dict, family: str | None = None, recipe: dict | None = None,
                          vision_tower: str | None = None, tower_in_weights: bool = False) -> dict:
    """Original LLaVA `config.json`: the LLM's keys at the top level plus the mm_* keys the originals' builders read,
    written so that `original_family` reads the same model back.

    `recipe`: the family's final stage (`image_aspect_ratio`, `max_length`); `vision_tower`: what `mm_vision_tower`
    names (the originals build the tower from it; default: CLIP-L/336's hub name); `tower_in_weights`: the exported
    weights hold the tower."""
    llm, vision = model["llm"], model["vision"]
    cfg = with_legacy_rope(llm_config(llm, meta).to_dict(), llm)
    qwen2 = bool(llm.get("attention_bias"))   # the v2 repos' Qwen2 class
    cfg.update(architectures=["LlavaQwenForCausalLM" if qwen2 else "LlavaLlamaForCausalLM"],
               model_type="llava_qwen" if qwen2 else "llava_llama", **ORIGINAL_TRAINING_KEYS,
               mm_hidden_size=vision["hidden_size"], mm_projector_type=model["projector_type"],
               mm_vision_select_layer=vision["select_layer"], mm_vision_select_feature=vision["select_feature"],
               mm_vision_tower=vision_tower or "openai/clip-vit-large-patch14-336", mm_patch_merge_type="flat",
               mm_use_im_start_end=family == "llavar", mm_use_im_patch_token=family == "llavar")
    if tower_in_weights:
        # the builders load the tower from mm_vision_tower unless this is set, with it from these weights (the tower
        # may have been trained: UHD v2 fine-tunes it)
        cfg["unfreeze_mm_vision_tower"] = True
    recipe = recipe or {}
    if recipe.get("image_aspect_ratio"):
        cfg["image_aspect_ratio"] = recipe["image_aspect_ratio"]
    if recipe.get("max_length"):
        cfg["tokenizer_model_max_length"] = int(recipe["max_length"])
    if model["projector_type"] == "gated":
        cfg.update(slime_to_original(dict(model.get("slime") or {})))
    if model["projector_type"] in ("adapt_spatial_resampler_v2", "uhd_v2_query64"):
        cfg.update(model_mode="uhd_v2", feature_scale_mask=int(model.get("feature_scale_mask", 5)))
    return cfg
