"""LLaVAR: LLaVA v1 code base with a linear projector and `<im_start>` + 576 `<im_patch>` + `<im_end>` in the text.

Base LLM Vicuna-13B v1.1 (`13b`, default) or 7B; `tiny` for tests. Vocabulary = 32000 + `<im_patch>`, `<im_start>`,
`<im_end>` (32003); the new rows are initialised to the mean of the old ones when the tokenizer is extended.
Conversion of an original LLaVAR checkpoint:
  python -m tools.convert_torch import --src LLaVAR-13b/ --vision clip-vit-large-patch14-336/ \
      --config configs/llavar.py:13b --out checkpoints/llavar-13b
"""
from __future__ import annotations

from configs import common

EXTRA_TOKENS = ("<im_patch>", "<im_start>", "<im_end>")


def get_config(arg: str | None = None):
    variant = arg or "13b"
    llm = common.choose_llm("configs/llavar.py", variant)
    tiny = variant == "tiny"
    if not tiny:
        llm["vocab_size"] = 32000 + len(EXTRA_TOKENS)
        llm["max_position_embeddings"] = 2048
    c = common.base_config(common.TINY_VISION if tiny else common.CLIP_L_336, llm, projector_type="linear",
                           tiny=tiny)
    c.family = "llavar"
    c.variant = variant
    c.data = dict(image_aspect_ratio="pad", pad_color=(122, 116, 104), mm_use_im_start_end=True,
                  extra_tokens=EXTRA_TOKENS, conv_template="llavar_v1", max_length=2048)
    return c
