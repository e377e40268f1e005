"""Tiny random PyTorch reference models (transformers, CPU, float32) and comparison helpers for parity tests."""
from __future__ import annotations

import numpy as np
import torch
import transformers

TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=56,
                 patch_size=14, projection_dim=16, layer_norm_eps=1e-5, hidden_act="quick_gelu")
TINY_LLAMA = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=512, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False)


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2):
    """HF initialises norms to 1/0 and biases to 0; randomise everything so no parameter goes untested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1.0 + noise if ("norm" in name and name.endswith("weight")) else noise)
    return model.eval()


def tiny_clip(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = transformers.CLIPVisionConfig(**{**TINY_CLIP, **overrides})
    return randomize(transformers.CLIPVisionModel(cfg), seed)


def tiny_llama(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**TINY_LLAMA, **overrides})
    return randomize(transformers.LlamaForCausalLM(cfg), seed)


def tiny_llava(seed=0, image_token_index=127, text_overrides=None, vision_overrides=None):
    torch.manual_seed(seed)
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**{**TINY_CLIP, **(vision_overrides or {})}),
        text_config=transformers.LlamaConfig(**{**TINY_LLAMA, **(text_overrides or {})}),
        image_token_index=image_token_index, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=(TINY_CLIP["image_size"] // 14) ** 2)
    return randomize(transformers.LlavaForConditionalGeneration(cfg), seed)


def random_pixels(n, h, w, seed=0) -> np.ndarray:
    """Normalised-looking pixels, NHWC float32."""
    return np.random.default_rng(seed).normal(size=(n, h, w, 3)).astype(np.float32)


def to_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
