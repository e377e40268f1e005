"""Pieces shared by the experiment configs: the CLIP-L/336 tower, the Vicuna/Llama LLM sizes, tiny test sizes."""
from __future__ import annotations

import ml_collections

CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, patch_size=14,
                  image_size=336, layer_norm_eps=1e-5, hidden_act="quick_gelu", select_layer=-2,
                  select_feature="patch")
VICUNA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                 num_kv_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096)
VICUNA_13B = dict(VICUNA_7B, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
                  num_kv_heads=40)
# Tiny sizes for tests and CPU demos: every dimension divisible by the 8-device test mesh axes.
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, patch_size=14, image_size=56,
                   layer_norm_eps=1e-5, hidden_act="quick_gelu", select_layer=-2, select_feature="patch")
TINY_LLM = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512)


LLMS = {"7b": VICUNA_7B, "13b": VICUNA_13B, "tiny": TINY_LLM}


def choose_llm(config_file: str, variant: str) -> dict:
    if variant not in LLMS:
        raise ValueError(f"{config_file}: unknown variant {variant!r}; choose one of {sorted(LLMS)}")
    return dict(LLMS[variant])


def base_config(vision: dict, llm: dict, *, projector_type: str, tiny: bool) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(
        vision=dict(vision), llm=dict(llm), projector_type=projector_type,
        dtype="float32" if tiny else "bfloat16", param_dtype="float32",
        # 'cudnn' on GPU (flash attention); 'xla' on CPU/TPU and for parity tests.
        attention_impl="xla",
        remat_policy="none" if tiny else "save_attn_mlp_out",
        scan_layers=not tiny,
        vision_trainable=False,
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.axis_rules = None  # None = uhd_jax.parallel.sharding.DEFAULT_RULES
    return c
