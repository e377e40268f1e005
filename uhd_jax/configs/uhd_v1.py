"""LLaVA-UHD v1 (ECCV'24): UHD slicing (M=7), CLIP-L/336 on each slice at its own size, the spatially constrained
resampler (144 queries in 12x12 windows), the v1 spatial schema (',' / '\\n' after slices, overview last).

Stages (spec uhd.md §6): `pretrain` (LCS-558K captions, `plain`, overview image only, resampler trainable, lr 1e-3,
batch 256) then `sft` (mix665k, `vicuna_v1`, M=7 slices with 10% 6-slice rescaling and TextVQA at 1024, LLM +
resampler at 2e-5, ViT frozen, batch 128 = 4/GPU x 8 x accum 4, max length 2048).
Variants: `13b` (default; HF guozonghao96/llava-uhd-144-13b), `7b`, `qwen2_7b` (Qwen2-7B-Instruct with the `qwen_1_5`
template: the v2-head code's `adapt_spatial_resampler_v1` on Qwen2), `arxiv64` (the March-2024 64-query resampler
with one full cross-attention, 8 heads, for the paper's compute comparison), `1b` (TinyLlama-1.1B: the speed target's
1B-class LLM, benchmarks/README.md), `tiny` (tests), `demo` (CPU demo sizes), `13b_tiny` (the 13b recipe at `tiny`'s
sizes: the README's commands at test size), `13b_lora` / `7b_lora` (the SFT through LoRA with LLaVA-1.5's LoRA recipe:
r 128, alpha 256, dropout 0.05, 2e-4; the resampler fully at 2e-5).

  uhd-convert import --src data/checkpoints/vicuna-13b-v1.5/ \\
      --vision data/checkpoints/clip-vit-large-patch14-336/ \\
      --config configs/uhd_v1.py:13b --out data/checkpoints/uhd_v1-13b-init
  uhd-train --config configs/uhd_v1.py:13b --workdir runs/uhd_v1-13b
Expected (spec §8, issue #1 of the original repo, unverified against the PDF): TextVQA 67.7, GQA 65.2, VQAv2 81.7
for the 13B model; ~1 day on 8xA100.
"""
from __future__ import annotations

from uhd_jax.configs import common

LLM_OF = {"13b": "13b", "7b": "7b", "qwen2_7b": "7b", "1b": "1b", "arxiv64": "13b", "tiny": "tiny", "demo": "demo"}


def get_config(arg: str | None = None):
    variant = arg or "13b"
    if variant == "13b_tiny":
        return tiny_recipe(get_config("13b"), variant)
    if variant.endswith("_lora") and variant[:-5] in ("7b", "13b"):
        # No LoRA recipe ships with the UHD code: LLaVA-1.5's (the codebase it extends) on this model's SFT stage
        return common.lora_recipe(get_config, variant, lr=2e-4)
    if variant not in LLM_OF:
        raise ValueError(f"configs/uhd_v1.py: unknown variant {variant!r}; choose one of "
                         f"{sorted(LLM_OF) + ['13b_tiny', '7b_lora', '13b_lora']}")
    small = variant in ("tiny", "demo")
    llm = common.choose_llm("configs/uhd_v1.py", LLM_OF[variant])
    if variant == "qwen2_7b":
        from uhd_jax.configs.uhd_v2 import QWEN2_7B  # one copy of the Qwen2 sizes (uhd_v2 imports this module at load time)

        llm = dict(QWEN2_7B)
    projector = {"arxiv64": "arxiv_resampler", "demo": "uhd_v1_query64"}.get(variant, "adapt_spatial_resampler")
    c = common.base_config(common.VISIONS[LLM_OF[variant]], llm, projector_type=projector, tiny=small)
    c.family = "uhd_v1"
    c.variant = variant
    c.tokenizer = "synthetic/tokenizer" if small else {
        "1b": "checkpoints/TinyLlama-1.1B", "qwen2_7b": "checkpoints/Qwen2-7B-Instruct"}.get(
        variant, f"checkpoints/vicuna-{LLM_OF[variant]}-v1.5")
    c.data.update(dict(
        # slices: spec §1.1; 10% rescaled to ~6 slices in training; TextVQA images pre-resized to 1024
        slicing=dict(max_slices=7, scale_resolution=336, patch_size=14, augment_prob=0.1, augment_slices=6,
                     textvqa_long_side=1024),
        # LLaMA's ids of ',' and '\n' for every LLM: the v2-head code keeps them with Qwen2 too (spec §1.1)
        schema="v1", separator_ids={",": 29892, "\n": 13}, separator_tokens=(),
        patch_budget=0,        # 0: (max_slices + 1) x 577 slots per sample, see uhd_jax/data/uhd_images.py
        # the original casts window boxes to the compute dtype before roi_align: bf16 in training (fp16 in its v1 eval)
        roi_taps=16, box_dtype="" if small else "bfloat16",
    ))
    base = "qwen2_7b" if variant == "qwen2_7b" else LLM_OF[variant]   # arxiv64 starts from the 13b init
    init = [] if small else [f"checkpoints/uhd_v1-{base}-init"]
    # pos_embed is the fixed sin-cos table (requires_grad False in the original): never trained.
    resampler = [("projector/pos_embed", "frozen"), ("projector/.*", "projector")]
    c.stage_order = ("pretrain", "sft")
    c.stages = {
        "pretrain": common.stage(
            template="plain", init_checkpoints=init, slicing=dict(overview_only=True, augment_prob=0.0),
            sources=[dict(json="LLaVA-Pretrain/blip_laion_cc_sbu_558k.json", image_folder="LLaVA-Pretrain/images")],
            trainable=resampler + [(".*", "frozen")], lrs={"projector": 1e-3}, batch_size=256, max_length=2048),
        "sft": common.stage(
            template="qwen_1_5" if variant == "qwen2_7b" else "vicuna_v1", init_from_stage="pretrain",
            sources=[dict(json="llava_v1_5_mix665k.json", image_folder=".")],
            trainable=[("vision/.*", "frozen")] + resampler + [("llm/.*", "llm")],
            lrs={"projector": 2e-5, "llm": 2e-5}, batch_size=128, grad_accum=4, max_length=2048,
            length_buckets=(640, 1024, 1280)),   # modelled mix665k with slices: 57.4% -> 21.1% padding
    }
    if small:
        # Slices of ~(image_size)^2 area for the small towers; separators from the synthetic tokenizer.
        c.data.slicing.update(scale_resolution=c.model.vision.image_size,
                              max_slices=3 if variant == "tiny" else 4, textvqa_long_side=0)
        c.data.update(separator_tokens=(",", "\n"), num_workers=0 if variant == "tiny" else 2,
                      roi_taps=16)
        c.data_root = "runs/demo/data" if variant == "demo" else ""
        for name, js in (("pretrain", "train_pretrain.json"), ("sft", "train_sft.json")):
            st = c.stages[name]
            st.update(sources=[dict(json=f"synthetic/{js}", image_folder="synthetic/images")], max_length=640,
                      save_every=100, batch_size=8, grad_accum=1, length_buckets=())
        c.stages.pretrain.update(lrs={"projector": 2e-3})
        c.stages.sft.update(lrs={"projector": 1e-3, "llm": 1e-3}, grad_clip_norm=1.0)
    return c


def tiny_recipe(c, variant: str):
    """`c` (a full-size UHD config) at test sizes (common.tiny_recipe), with `tiny`'s slicing for the small tower and
    the separators looked up in whatever tokenizer the recipe names."""
    common.tiny_recipe(c, variant, max_length=640)
    c.data.slicing.update(scale_resolution=c.model.vision.image_size, max_slices=3, textvqa_long_side=0)
    c.data.update(separator_tokens=(",", "\n"), box_dtype="")
    return c
