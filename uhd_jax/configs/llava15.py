"""LLaVA-1.5: CLIP-L/336 (layer -2, CLS dropped), mlp2x_gelu projector, Vicuna-v1.5, images padded to square.

Stages (spec A.8): `pretrain` (LCS-558K captions, `plain`, projector only, lr 1e-3, batch 256, images center-cropped)
then `sft` (mix665k, `vicuna_v1`, projector + LLM at 2e-5, batch 128, `pad`); vision frozen throughout.
Variants: `7b` (default), `13b`, `1b` (TinyLlama-1.1B: the 1B-class speed comparison, benchmarks/README.md),
`tiny` (tests), `demo` (the CPU demo on the synthetic dataset), `7b_tiny` (the 7b recipe - stages, data paths,
tokenizer - at `tiny`'s sizes: the README's commands at test size), `7b_lora` (the released llava-v1.5-7b-lora: SFT
through LoRA r 128 / alpha 256 / dropout 0.05 on every LLM linear layer at 2e-4, the projector fully at 2e-5),
`7b_qlora` (7b_lora over an int4 frozen base, quantised as the float checkpoint loads).

  uhd-convert import --src data/checkpoints/vicuna-7b-v1.5/ \
      --vision data/checkpoints/clip-vit-large-patch14-336/ \
      --config configs/llava15.py:7b --out data/checkpoints/llava15-7b-init
  uhd-train --config configs/llava15.py:7b --workdir runs/llava15-7b
Expected (MODEL_ZOO): the released 7B scores TextVQA 58.2, GQA 62.0, POPE 85.9; 3.5 h + 10 h on 8xA100-80G.
The demo (`make demo`, issue #19; configs/uhd_v2.py:demo is its other half; `demo_stages` below), 2026-12-03, commit
7c586e8, 12.5 min: held-out code (fine) 9.5 / 9.0% against UHD v2's 74.0 / 78.0% (image-blind 9.5%); coarse
70.5 / 85.0% against UHD v2's 80.0 / 84.5% (image-blind 30%) (README, Quick start).
"""
from __future__ import annotations

from uhd_jax.configs import common

# The demo's passes over its 2000 training cards and rates, shared with configs/uhd_v2.py:demo (equal training).
# The projector's stage-1 rate is a tenth of the LLM's: at the LLM's 3e-3, UHD v2's HiWin projector drifted while the
# random LLM was still learning the language (a linear probe of its tokens read the card colour on 92% of cards after
# one step, 51% after stage 1; caption loss stalled at 0.52); at 3e-4 the probe kept 89.5% and the loss reached 0.32.
# LLaVA-1.5's MLP projector learns either way (held-out fine / coarse 8.0 / 67.5% at 3e-3, 9.5 / 68.5% at 3e-4).
# Stage 2's second epoch is for the coarse answers: UHD v2's coarse 46.5% after one, 57.5% after two (seed 0); a
# 3x rate for one epoch did not do it (47.5%).
DEMO_EPOCHS = {"pretrain": 3.0, "sft": 2.0}
DEMO_LRS = {"pretrain": {"projector": 3e-4, "llm": 3e-3}, "sft": {"llm": 1e-3}}
# Both demo ViTs start from the glyph reader `make demo` installs (uhd_jax.train.glyph_vit), under data_root.
DEMO_VIT = "synthetic/glyph_vit"


def demo_stages(c, frozen_in_projector=()):
    """Both demo models' training, so that only the image path differs: the ViT starts from the pretrained glyph
    reader and stays frozen, as CLIP does in LLaVA-1.5's and LLaVA-UHD's recipes. Stage 1 trains the projector and
    the random LLM on the captions (the real stage 1 aligns a projector to a pretrained LLM; here the LLM has to
    learn the language too); stage 2 trains the LLM alone (training the projector as well lost what stage 1 had
    learned of the image, README Quick start). `frozen_in_projector`: projector parameters that stay as initialised."""
    frozen = [(p, "frozen") for p in frozen_in_projector] + [("vision/.*", "frozen")]
    pre, sft = c.stages.pretrain, c.stages.sft
    pre.update(init_checkpoints=[DEMO_VIT], init_from_stage="", num_epochs=DEMO_EPOCHS["pretrain"],
               trainable=frozen + [("projector/.*", "projector"), ("llm/.*", "llm")])
    pre.lrs = dict(DEMO_LRS["pretrain"])
    sft.update(num_epochs=DEMO_EPOCHS["sft"], trainable=frozen + [("projector/.*", "frozen"), ("llm/.*", "llm")])
    sft.lrs = dict(DEMO_LRS["sft"])
    for stage in (pre, sft):
        stage.update(vision_trainable=False, grad_clip_norm=1.0, batch_size=16)
    # Data prepared in the training process: on the 2-core machine the demo is made for, Grain worker processes
    # compete with XLA's two threads (UHD v2's stage 1, 250 steps: 114 s with none, 129 s with 2).
    c.data.num_workers = 0


def get_config(arg: str | None = None):
    variant = arg or "7b"
    if variant == "7b_tiny":
        return common.tiny_recipe(get_config("7b"), variant, max_length=160)
    if variant == "7b_lora":   # spec A.8's LoRA SFT: r 128, alpha 256, LoRA lr 2e-4, projector 2e-5
        return common.lora_recipe(get_config, variant, lr=2e-4)
    if variant == "7b_qlora":   # 7b_lora over an int4 (per-group-of-64) frozen base
        return common.lora_recipe(get_config, variant, lr=2e-4, quant="int4")
    llm = common.choose_llm("configs/llava15.py", variant, also=("7b_tiny", "7b_lora", "7b_qlora"))
    small = variant in ("tiny", "demo")
    c = common.base_config(common.VISIONS[variant], llm, projector_type="mlp2x_gelu", tiny=small)
    c.family = "llava15"
    c.variant = variant
    c.tokenizer = {"1b": "checkpoints/TinyLlama-1.1B"}.get(variant, "checkpoints/vicuna-7b-v1.5") if not small \
        else "synthetic/tokenizer"
    init = [f"checkpoints/llava15-{variant}-init"] if not small else []
    c.stage_order = ("pretrain", "sft")
    c.stages = {
        "pretrain": common.stage(
            template="plain", image_aspect_ratio="square", init_checkpoints=init,
            sources=[dict(json="LLaVA-Pretrain/blip_laion_cc_sbu_558k.json", image_folder="LLaVA-Pretrain/images")],
            trainable=[("projector/.*", "projector"), (".*", "frozen")], lrs={"projector": 1e-3},
            batch_size=256, max_length=2048, length_buckets=(640,)),
        "sft": common.stage(
            template="vicuna_v1", init_from_stage="pretrain",
            sources=[dict(json="llava_v1_5_mix665k.json", image_folder=".")],
            trainable=[("vision/.*", "frozen"), ("projector/.*", "projector"), ("llm/.*", "llm")],
            lrs={"projector": 2e-5, "llm": 2e-5}, batch_size=128, max_length=2048,
            # padding of a modelled mix665k 59.6% -> 17.6% (python -m uhd_jax.perf.lengths)
            length_buckets=(768, 896, 1024)),
    }
    if small:
        c.data.num_workers = 0 if variant == "tiny" else 2
        c.data_root = "runs/demo/data" if variant == "demo" else ""
        synthetic = dict(pretrain=("train_pretrain.json", "images"), sft=("train_sft.json", "images"))
        for name, (js, folder) in synthetic.items():
            st = c.stages[name]
            st.sources = [dict(json=f"synthetic/{js}", image_folder="synthetic/" + folder)]
            st.max_length = 160
            st.length_buckets = ()
            st.save_every = 100
            st.batch_size = 16
        # Random-init towers learn far faster than pretrained ones fine-tune: larger rates, a few epochs.
        c.stages.pretrain.update(lrs={"projector": 2e-3}, num_epochs=1.0)
        c.stages.sft.update(lrs={"projector": 1e-3, "llm": 1e-3}, num_epochs=4.0, grad_clip_norm=1.0)
    if variant == "demo":
        demo_stages(c)
        # Stage 1's captions spell out everything on the card, the small code included, on the same padded images
        # stage 2 and evaluation see. Lengths: the longest sample plus a few tokens.
        c.stages.pretrain.update(image_aspect_ratio="pad", max_length=88)
        c.stages.sft.max_length = 176
    return c
