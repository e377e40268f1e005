"""SliME ("Beyond LLaVA-HD", spec llava15_slime_llavar.md §C): CLIP-L/336 on a distorted 336 global view and 2..7
letterboxed 336 tiles; the global view through the gated mixture of adapters (MLP | MLP after a 576-query resampler),
the tiles through the 144-query local compressor + the MLP in 'spatial' order, routed by the text (top-p 0.95);
global + ',' + kept local tokens go to the LLM.

Stages = the original's four runs (§C.6), each 1 epoch, cosine, warmup 0.03, batch 256 then 128, max length 2048:
  mlp_adapter       (1a, `*-proj`)  LCS-558K, plain, global view only, expert 0 (the MLP) trains     lr 1e-3 (8b: 5e-4)
  attn_adapter      (1b, `*-atten`) the same data, expert 1: only the 576-query resampler trains       lr 1e-3 (8b: 5e-4)
  local_compressor  (1c, `*-pt`)    local tokens only (top-p 1.0 keeps all), only the sampler trains   lr 1e-3 (8b: 5e-4)
  sft               (2)             ShareGPT4V mix665k + SMR, LLM + projector + sampler, CLIP frozen  lr 2e-5 (8b: 1e-5)
Variants: `7b` (default, Vicuna-7B v1.5, `vicuna_v1`), `13b`, `8b` (Llama-3-8B-Instruct, `llama3` template,
separator ',' = 11), `8b_lora` / `70b_lora` (Llama-3-8B / 70B-Instruct, the SFT through LoRA r 128 / alpha 256 at
1e-4 on every LLM linear layer, projector and sampler fully at 2e-5), `tiny` (tests), `demo` (CPU sizes on the synthetic dataset), `7b_tiny` (the 7b recipe at `tiny`'s
sizes: the README's commands at test size). Seed 3407 as the original scripts.

  uhd-convert import --src data/checkpoints/vicuna-7b-v1.5/ \\
      --vision data/checkpoints/clip-vit-large-patch14-336/ \\
      --config configs/slime.py:7b --out data/checkpoints/slime-7b-init
  uhd-train --config configs/slime.py:7b --workdir runs/slime-7b
A released model (HF yifanzhang114/SliME-vicuna-7B) imports directly: --src SliME-vicuna-7B/ --vision clip.../
Expected: the only number verified in the spec is SliME-8B's Video-MME 45.3 (8 frames, w/o subtitles); the paper's
image benchmarks could not be retrieved (spec §C.10).
"""
from __future__ import annotations

from uhd_jax.configs import common

VARIANTS = ("7b", "13b", "8b", "tiny", "demo", "7b_tiny", "8b_lora", "70b_lora")
PRETRAIN = [dict(json="LLaVA-Pretrain/blip_laion_cc_sbu_558k.json", image_folder="LLaVA-Pretrain/images")]
SFT_DATA = [dict(json="sharegpt4v_mix665k_cap23k_coco-ap9k_lcs3k_sam9k_div2k.json", image_folder="."),
            dict(json="SMR/SMR.json", image_folder="SMR")]
# The fixed sin-cos tables are stored as parameters without gradient in the original, and w_noise is never read
# (the gate noise uses w_gate): never trained.
POS_TABLES = [("projector/(attn|sampler/post_qformer)/pos_embed", "frozen"), ("projector/w_noise", "frozen")]


def get_config(arg: str | None = None):
    variant = arg or "7b"
    if variant == "7b_tiny":
        c = common.tiny_recipe(get_config("7b"), variant, max_length=160)
        grid = c.model.vision.image_size // c.model.vision.patch_size
        # the ',' separator looked up in the tokenizer, as in `tiny`
        c.model.slime.update(separator_id=-1, global_grid=grid, local_grid=grid // 2)
        return c
    if variant not in VARIANTS:
        raise ValueError(f"configs/slime.py: unknown variant {variant!r}; choose one of {list(VARIANTS)}")
    if variant in ("8b_lora", "70b_lora"):   # §C.6's LoRA SFT (scripts/llama-lora): r 128, alpha 256, lr 1e-4
        c = get_config("8b")
        c.variant = variant
        if variant == "70b_lora":
            c.model.llm = dict(common.LLAMA3_70B)
            c.tokenizer = "checkpoints/Meta-Llama-3-70B-Instruct"
            for st in c.stages.values():
                st.init_checkpoints = [p.replace("-8b-init", "-70b-init") for p in st.init_checkpoints]
        sft = common.lora_stage(c.stages.sft, common.LORA_R128, lr=1e-4, grad_accum=common.LORA_GRAD_ACCUM)
        sft.lrs = dict(sft.lrs, projector=2e-5)   # projector and sampler (both under projector/) fully, at 2e-5
        return c
    small = variant in ("tiny", "demo")
    llama3 = variant == "8b"
    llm = dict(common.LLAMA3_8B) if llama3 else common.choose_llm("configs/slime.py", variant)
    vision = common.VISIONS["7b" if llama3 else variant]
    c = common.base_config(vision, llm, projector_type="gated", tiny=small)
    grid = vision["image_size"] // vision["patch_size"]
    # separator_id -1: looked up in the tokenizer at training time (the synthetic tokenizers' ',' has no fixed id)
    c.model.slime = dict(views="both", expert=-1, topp=0.95, temperature=1.0,
                         separator_id=-1 if small else 11 if llama3 else 1919, max_tiles=7, gate_noise=True,
                         router_noise=True, global_grid=grid, local_grid=grid // 2, num_heads=0)
    c.family = "slime"
    c.variant = variant
    c.seed = 3407
    c.tokenizer = ("synthetic/tokenizer" if small else "checkpoints/Meta-Llama-3-8B-Instruct" if llama3
                   else f"checkpoints/vicuna-{variant}-v1.5")
    init = [] if small else [f"checkpoints/slime-{variant}-init"]
    lr = 5e-4 if llama3 else 1e-3
    c.stage_order = ("mlp_adapter", "attn_adapter", "local_compressor", "sft")
    c.stages = {
        "mlp_adapter": common.stage(
            template="plain", sources=PRETRAIN, init_checkpoints=init,
            model=dict(slime=dict(views="global", expert=0)),
            trainable=[("projector/projection/.*", "projector"), (".*", "frozen")], lrs={"projector": lr},
            batch_size=256, max_length=2048),
        "attn_adapter": common.stage(
            template="plain", sources=PRETRAIN, init_from_stage="mlp_adapter",
            model=dict(slime=dict(views="global", expert=1)),
            trainable=POS_TABLES + [("projector/attn/.*", "projector"), (".*", "frozen")], lrs={"projector": lr},
            batch_size=256, max_length=2048),
        "local_compressor": common.stage(
            template="plain", sources=PRETRAIN, init_from_stage="attn_adapter",
            model=dict(slime=dict(views="local", topp=1.0)),
            trainable=POS_TABLES + [("projector/sampler/.*", "projector"), (".*", "frozen")], lrs={"projector": lr},
            batch_size=256, max_length=2048),
        "sft": common.stage(
            template="llama3" if llama3 else "vicuna_v1", sources=SFT_DATA, init_from_stage="local_compressor",
            trainable=[("vision/.*", "frozen")] + POS_TABLES + [("projector/.*", "projector"), ("llm/.*", "llm")],
            lrs={"projector": 1e-5 if llama3 else 2e-5, "llm": 1e-5 if llama3 else 2e-5}, batch_size=128,
            max_length=2048),
    }
    if small:
        c.data.num_workers = 0 if variant == "tiny" else 2
        c.data_root = "runs/demo/data" if variant == "demo" else ""
        for name in c.stage_order:
            js = "train_sft.json" if name == "sft" else "train_pretrain.json"
            c.stages[name].update(sources=[dict(json=f"synthetic/{js}", image_folder="synthetic/images")],
                                  max_length=160, save_every=100, batch_size=8)
            c.stages[name].lrs = {g: 2e-3 for g in c.stages[name].lrs}
    if variant == "demo":
        # As the LLaVA-1.5 demo: with no pretrained CLIP or LLM to start from, every stage trains every tower (the
        # stages still differ in what the LLM sees: global tokens through expert 0, then expert 1, local tokens only,
        # then the routed mixture); captions get most of the budget.
        everything = POS_TABLES + [("vision/.*", "vision"), ("projector/.*", "projector"), ("llm/.*", "llm")]
        epochs = dict(mlp_adapter=2.0, attn_adapter=0.5, local_compressor=0.5, sft=2.0)
        for name in c.stage_order:
            c.stages[name].update(trainable=everything, vision_trainable=True, grad_clip_norm=1.0,
                                  lrs={"vision": 1e-3, "projector": 1e-3, "llm": 1e-3}, num_epochs=epochs[name],
                                  batch_size=16, max_length=288 if name == "sft" else 224)
    return c
