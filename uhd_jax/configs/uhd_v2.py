"""LLaVA-UHD v2: UHD slicing, CLIP-L/336 per slice, the JBU inverse feature pyramid (1x -> 2x -> 4x) and the
hierarchical window (HiWin) projector (144 tokens per slice), spec uhd.md §3.3-§6.

Variants: `7b` (default; the paper's Vicuna-7B model, v2-dec2024 code: grid spatial schema, pretrain max length 3072,
SFT 4096 with ViT + HiWin + JBU fixup + LLM trainable at 2e-5, batch 128, M=7), `qwen2_7b` and `13b` (v2-head:
v1 spatial schema, Qwen2-7B-Instruct with the `qwen_1_5` template / Vicuna-13B), `tiny` (tests), `demo`, `7b_tiny`
(the 7b recipe at `tiny`'s sizes: the README's commands at test size), `7b_lora` / `13b_lora` (the SFT's LLM through
LoRA with LLaVA-1.5's LoRA recipe: r 128, alpha 256, dropout 0.05, 2e-4; ViT and projector as in `sft`).
`model.feature_scale_mask`: 5 = {1x, 4x} (v2-head scripts); the dec2024 script's value is not recorded, 7 = all.
Stages (spec §4.4, §6): `jbu` (the JBU inverse pyramid alone, FeatUp multi-view reconstruction against the frozen
ViT on an image folder - COCO-stuff train2017 in the paper; NAdam 1e-3, batch 16, 2000 steps as the released
`clip-large-vdim.ckpt`), `pretrain` (captions, overview only, projector minus the JBU trainable, lr 1e-3, batch 256,
starting from the `jbu` stage's upsampler) and `sft`.

  uhd-convert import --src data/checkpoints/vicuna-7b-v1.5/ \
      --vision data/checkpoints/clip-vit-large-patch14-336/ \
      --config configs/uhd_v2.py:7b --out data/checkpoints/uhd_v2-7b-init
  uhd-train --config configs/uhd_v2.py:7b --workdir runs/uhd_v2-7b          # jbu, pretrain, sft
  # or skip the JBU stage with the released VDIM checkpoint (imported with --layout vdim into
  # data/checkpoints/clip-large-vdim; config paths are under data_root):
  uhd-train --config configs/uhd_v2.py:7b --workdir runs/uhd_v2-7b --stages=pretrain,sft \
      --config.stages.pretrain.init_from_stage= \
      --config.stages.pretrain.init_checkpoints=checkpoints/uhd_v2-7b-init,checkpoints/clip-large-vdim
Expected (spec §8): +3.7% average over 14 benchmarks vs LLaVA-UHD; TextVQA 70.6 for the Qwen2-7B checkpoint
(68.92 reproduced by a user).
"""
from __future__ import annotations

from uhd_jax.configs import common, uhd_v1
from uhd_jax.configs.llava15 import demo_stages

QWEN2_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                num_kv_heads=4, rms_norm_eps=1e-6, rope_theta=1e6, attention_bias=True,
                max_position_embeddings=32768)
BASE = {"7b": "7b", "qwen2_7b": "7b", "13b": "13b", "tiny": "tiny", "demo": "demo"}
JBU_STAGES = "projector/upsampler/up[12]/.*"   # the JBU itself: trained in its own stage, frozen in LLaVA training


def get_config(arg: str | None = None):
    variant = arg or "7b"
    if variant == "7b_tiny":
        return tiny_recipe(get_config("7b"), variant)
    if variant.endswith("_lora") and variant[:-5] in ("7b", "13b"):
        # No LoRA recipe ships with the UHD code: LLaVA-1.5's (the codebase it extends) on this model's SFT stage
        return common.lora_recipe(get_config, variant, lr=2e-4)
    if variant not in BASE:
        raise ValueError(f"configs/uhd_v2.py: unknown variant {variant!r}; choose one of "
                         f"{sorted(BASE) + ['7b_tiny', '7b_lora', '13b_lora']}")
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
        sft.length_buckets = (768, 1024, 1280)   # modelled v2 SFT lengths: 78.0% -> 34.8% padding
    c.stages.jbu = jbu_stage(variant, c, init)
    c.stage_order = ("jbu", "pretrain", "sft")
    pre.init_from_stage = "jbu"
    if variant == "demo":
        demo_recipe(c)
    return c


def demo_recipe(c):
    """`make demo`: the LLaVA-1.5 demo's towers, data, stages, epochs, batch, rates and rules
    (configs/llava15.py:demo_stages), so the two compare at equal training. What differs is the image path: the card
    at its native aspect ratio in up to 4 slices of ~112^2 plus the overview, each through the JBU pyramid (1x and 2x
    levels) and HiWin windows into a few tokens, instead of one padded 112 px square of 64 tokens. The ViT the JBU
    upsamples is the pretrained glyph reader, frozen. The JBU is frozen too, as the real recipe freezes it after its
    `jbu` stage; the demo runs no `jbu` stage, so it stays as initialised: a smoothing, image-guided 2x upsampler (its
    range kernel from random guidance projections). Training it in stage 1 took the step from 0.39 to 0.94 s (its
    gathers' gradients) and did not read better (README, Quick start). Its FLOPs still count as trained ones (3x)."""
    c.model.projector_type = "uhd_v2_query4"
    c.model.feature_scale_mask = 3
    c.data.level_roi_taps = 64   # a 2x2 window grid pools bins of up to 7 x 7 pixels of the 4x map
    c.stage_order = ("pretrain", "sft")
    demo_stages(c, frozen_in_projector=("projector/pos_embed", "projector/upsampler/.*"))
    # Stage 1 sees the slices too: the real recipe's overview-only pretraining aligns a projector to a ViT and an
    # LLM that can already read; here stage 1 is where the LLM learns to read the slices' glyph features.
    c.stages.pretrain.slicing = dict(overview_only=False, augment_prob=0.0)
    c.data.slicing.update(max_slices=4, augment_prob=0.0)
    c.stages.pretrain.max_length = 48   # the longest sample plus a few tokens, as llava15's
    c.stages.sft.max_length = 140


def jbu_stage(variant: str, c, init: list):
    """Spec §4.4: the released VDIM checkpoint's recipe (lr 1e-3, max pad 30, 2 jitters, ChannelNorm on, batch 2 x 8
    GPUs, step 2000). Small variants scale the pad with the image (30 px at 336) and save the random ViT they were
    trained against, so the LLaVA stages start from the same features."""
    size = c.model.vision.image_size
    small = variant in ("tiny", "demo")
    stage = common.stage(
        template="", kind="jbu", init_checkpoints=init, trainable=[], lrs={}, max_length=0,
        sources=[dict(image_folder="synthetic/images/train" if small else "cocostuff/images/train2017")],
        batch_size=16, num_steps=2000, save_every=500, lr=1e-3, image_size=size, n_jitters=2,
        max_pad=max(1, round(30 * size / 336)), max_zoom=2.0, proj_dim=30, crf_weight=0.001,
        crf_samples=1000, channel_norm=True, warm_clip_norm=1e-4, warm_clip_steps=10, save_featurizer=small)
    if small:
        stage.update(batch_size=8, num_steps=40 if variant == "demo" else 6, save_every=20,
                     crf_samples=256 if variant == "demo" else 64)
    return stage


def tiny_recipe(c, variant: str):
    """The 7b recipe at test sizes (uhd_v1.tiny_recipe); its `jbu` stage at `tiny`'s sizes, still reading the
    recipe's image folder and init checkpoint."""
    uhd_v1.tiny_recipe(c, variant)
    size = c.model.vision.image_size
    c.stages.jbu.update(image_size=size, max_pad=max(1, round(30 * size / 336)), batch_size=8, num_steps=2,
                        save_every=20, crf_samples=64)
    return c
