"""LLaVA-1.5: CLIP-L/336 (layer -2, CLS dropped), mlp2x_gelu projector, Vicuna-v1.5; images padded to square.

Variants: `7b` (default), `13b`, `tiny` (random-weight test size).
Training stages and their run commands arrive with the training system; today this config drives conversion:
  python -m tools.convert_torch import --src llava-v1.5-7b/ --vision clip-vit-large-patch14-336/ \
      --config configs/llava15.py:7b --out checkpoints/llava15-7b
Expected: the imported model reproduces the PyTorch logits (tests/test_llava_parity.py measures <= 1e-5 in fp32).
"""
from __future__ import annotations

from configs import common


def get_config(arg: str | None = None):
    variant = arg or "7b"
    llm = common.choose_llm("configs/llava15.py", variant)
    tiny = variant == "tiny"
    c = common.base_config(common.TINY_VISION if tiny else common.CLIP_L_336, llm,
                           projector_type="mlp2x_gelu", tiny=tiny)
    c.family = "llava15"
    c.variant = variant
    c.data = dict(image_aspect_ratio="pad", pad_color=(122, 116, 104), mm_use_im_start_end=False,
                  conv_template="vicuna_v1", max_length=2048)
    return c
