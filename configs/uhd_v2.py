"""LLaVA-UHD v2: UHD slicing, CLIP-L/336 per slice, the JBU inverse feature pyramid (1x -> 2x -> 4x) and the
hierarchical window (HiWin) projector (144 tokens per slice), spec uhd.md §3.3-§6.

Variants: `7b` (default; the paper's Vicuna-7B model, v2-dec2024 code: grid spatial schema, pretrain max length 3072,
SFT 4096 with ViT + HiWin + JBU fixup + LLM trainable at 2e-5, batch 128, M=7), `qwen2_7b` and `13b` (v2-head:
v1 spatial schema, Qwen2-7B-Instruct with the `qwen_1_5` template / Vicuna-13B), `tiny` (tests), `demo`.
`model.feature_scale_mask`: 5 = {1x, 4x} (v2-head scripts); the dec2024 script's value is not recorded, 7 = all.
Stages: `pretrain` (captions, overview only, projector minus the JBU trainable, lr 1e-3, batch 256) and `sft`.
The JBU pretraining stage of §4.4 is not part of this file yet (issue #5): start from an imported v2 checkpoint.

  python -m tools.convert_torch import --src LLaVA-UHD-v2/ --config configs/uhd_v2.py:7b --out checkpoints/uhd_v2-7b
  python launch/train.py --config configs/uhd_v2.py:7b --workdir runs/uhd_v2-7b --stages=sft
Expected (spec §8): +3.7% average over 14 benchmarks vs LLaVA-UHD; TextVQA 70.6 for the Qwen2-7B checkpoint
(68.92 reproduced by a user).
"""
from __future__ import annotations

from configs import uhd_v1

QWEN2_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                num_kv_heads=4, rms_norm_eps=1e-6, rope_theta=1e6, attention_bias=True,
                max_position_embeddings=32768)
BASE = {"7b": "7b", "qwen2_7b": "7b", "13b": "13b", "tiny": "tiny", "demo": "demo"}
JBU_STAGES = "projector/upsampler/up[12]/.*"   # the JBU itself: trained in its own stage, frozen in LLaVA training


def get_config(arg: str | None = None):
    variant = arg or "7b"
    if variant not in BASE:
        raise ValueError(f"configs/uhd_v2.py: unknown variant {variant!r}; choose one of {sorted(BASE)}")
    c = uhd_v1.get_config(BASE[variant])
    small = variant in ("tiny", "demo")
    c.family = "uhd_v2"
    c.variant = variant
    c.model.projector_type = "adapt_spatial_resampler_v2"
    c.model.feature_scale_mask = 5
    c.data.level_roi_taps = 36
    if variant == "qwen2_7b":
        c.model.llm = dict(QWEN2_7B)
        c.tokenizer = "checkpoints/Qwen2-7B-Instruct"
    c.data.schema = "grid" if variant == "7b" else "v1"
    init = [] if small else [f"checkpoints/uhd_v2-{variant}-init"]
    frozen_in_projector = [("projector/pos_embed", "frozen"), (JBU_STAGES, "frozen")]
    pre, sft = c.stages.pretrain, c.stages.sft
    pre.update(init_checkpoints=init,
               trainable=frozen_in_projector + [("projector/upsampler/.*", "frozen"), ("projector/.*", "projector"),
                                                (".*", "frozen")])
    sft.update(template="qwen_1_5" if variant == "qwen2_7b" else "vicuna_v1", vision_trainable=True,
               trainable=frozen_in_projector + [("projector/.*", "projector"), ("vision/.*", "vision"),
                                                ("llm/.*", "llm")],
               lrs=dict(sft.lrs.to_dict(), vision=sft.lrs["llm"]))  # the ViT at the LLM's rate (spec §6)
    if not small:
        pre.max_length = 3072 if variant == "7b" else 4096
        sft.max_length = 4096
    return c
