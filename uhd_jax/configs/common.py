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
# TinyLlama-1.1B (Llama-2 tokenizer and layout, GQA 32/4): the "1B-class LLM" of the speed targets (benchmarks/)
TINYLLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
                    num_kv_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048)
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                 num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192)
LLAMA3_70B = dict(LLAMA3_8B, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64)
# The originals' LoRA SFT (LLaVA-1.5 `finetune_lora.sh`, SliME `scripts/llama-lora`): every linear layer of the LLM,
# dropout 0.05 (LLaVA's train.py default, which SliME's scripts keep).
LORA_R128 = dict(rank=128, alpha=256.0, dropout=0.05, targets=("q", "k", "v", "o", "gate", "up", "down"))
# Tiny sizes for tests and CPU demos: every dimension divisible by the 8-device test mesh axes.
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, patch_size=14, image_size=56,
                   layer_norm_eps=1e-5, hidden_act="quick_gelu", select_layer=-2, select_feature="patch")
# The CPU demo (`make demo`, issue #19): images at 112 px (8 x 8 = 64 patches), vocabulary of the synthetic tokenizer.
# A narrow 3-layer ViT (pretrained to read digits: uhd_jax.train.glyph_vit) and a 2-layer LLM with a wide MLP: from
# random init, 8 layers of 128 did not learn to use the image in the demo's budget, 2 did (README, Quick start). The
# MLP went from 2048 to 1024 wide for time; the held-out results stayed within the seeds' spread or rose (README).
DEMO_VISION = dict(hidden_size=64, intermediate_size=256, num_layers=3, num_heads=4, patch_size=14, image_size=112,
                   layer_norm_eps=1e-5, hidden_act="quick_gelu", select_layer=-2, select_feature="patch")
DEMO_LLM = dict(vocab_size=1024, hidden_size=128, intermediate_size=1024, num_layers=2, num_heads=4, num_kv_heads=2,
                rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=1024)
TINY_LLM = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512)


# `<variant>_tiny` (e.g. llava15 `7b_tiny`): a shipped recipe at test sizes, so that the README's commands run as
# written with only the variant changed (tests/test_readme_commands.py). Two vision layers instead of `tiny`'s three,
# so that a checkpoint's sizes name one variant (generation finds an unrecorded variant by its sizes).
RECIPE_TINY_VISION = dict(TINY_VISION, num_layers=2)

LLMS = {"1b": TINYLLAMA_1B, "7b": VICUNA_7B, "13b": VICUNA_13B, "tiny": TINY_LLM, "demo": DEMO_LLM}
VISIONS = {"1b": CLIP_L_336, "7b": CLIP_L_336, "13b": CLIP_L_336, "tiny": TINY_VISION, "demo": DEMO_VISION}


def choose_llm(config_file: str, variant: str, also: tuple = ()) -> dict:
    """The LLM sizes of `variant`; `also`: the file's other variants, named in the error for an unknown one."""
    if variant not in LLMS:
        raise ValueError(f"{config_file}: unknown variant {variant!r}; choose one of {sorted(LLMS) + list(also)}")
    return dict(LLMS[variant])


def base_config(vision: dict, llm: dict, *, projector_type: str, tiny: bool) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(
        vision=dict(vision), llm=dict(llm), projector_type=projector_type,
        dtype="float32" if tiny else "bfloat16", param_dtype="float32",
        # 'auto': cuDNN flash attention on GPU, Pallas flash on TPU, a chunked causal einsum on CPU
        # (uhd_jax.models.layers.resolve_attention_impl); 'xla' forces the plain kernel everywhere.
        attention_impl="auto",
        remat_policy="none" if tiny else "save_attn_mlp_out",
        scan_layers=not tiny,
        vision_trainable=False,
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.axis_rules = None  # None = uhd_jax.parallel.sharding.DEFAULT_RULES
    c.seed = 0
    # Every relative path of the config - data files, image folders, the tokenizer, init checkpoints - is under
    # data_root (itself relative to the current directory): one layout, `data/checkpoints/...` beside the datasets.
    c.data_root = "data"
    c.tokenizer = ""
    c.data = ml_collections.ConfigDict(dict(
        image_aspect_ratio="pad", max_images=1, num_workers=4, max_image_pixels=89_478_485, min_image_area=16,
        alpha="drop", slot_token="", image_prefix_tokens=(), image_suffix_tokens=()))
    return c


def stage(*, template: str, sources: list, trainable: list, lrs: dict, batch_size: int, max_length: int,
          num_epochs: float = 1.0, grad_accum: int = 1, warmup_ratio: float = 0.03, weight_decay: float = 0.0,
          save_every: int = 500, **extra) -> ml_collections.ConfigDict:
    """One training stage. `trainable`: [regex over parameter paths, group] (first match wins; group 'frozen' is not
    trained; every parameter must match). `lrs`: a learning rate per trained group."""
    fields = dict(
        template=template, sources=sources, trainable=trainable, lrs=lrs, batch_size=batch_size,
        max_length=max_length, num_epochs=num_epochs, num_steps=0, grad_accum=grad_accum, warmup_ratio=warmup_ratio,
        weight_decay=weight_decay, grad_clip_norm=0.0, save_every=save_every, keep=2, log_every=1, max_bad_steps=5,
        init_checkpoints=[], init_from_stage="",
        # () pads every row to max_length; see uhd_jax/data/buckets.py
        length_buckets=(), length_window=8)
    fields.update(extra)
    return ml_collections.ConfigDict(fields)


def tiny_recipe(c: ml_collections.ConfigDict, variant: str, *, max_length: int,
                llm: dict | None = None) -> ml_collections.ConfigDict:
    """Config `c` (a full-size variant) at test sizes as `variant` ('7b_tiny'): the same stages, templates, trainable
    rules, data sources and tokenizer, the init checkpoints renamed after `variant` (checkpoints/llava15-7b-init ->
    checkpoints/llava15-7b_tiny-init, as the README's `--out` with the variant changed), tiny towers, global batch 8
    (the test mesh's 8 devices) without accumulation, `max_length` tokens, in-process data loading."""
    base = c.variant
    c.variant = variant
    c.model.vision = dict(c.model.vision.to_dict(), **RECIPE_TINY_VISION)
    c.model.llm = dict(llm or TINY_LLM)
    c.model.update(dtype="float32", remat_policy="none", scan_layers=False)
    c.data.num_workers = 0
    for st in c.stages.values():
        st.init_checkpoints = [p.replace(f"-{base}-init", f"-{variant}-init") for p in st.init_checkpoints]
        if st.get("kind", "llava") != "jbu":
            st.update(batch_size=8, grad_accum=1, max_length=max_length, save_every=100, length_buckets=())
    return c


def lora_recipe(get_config, variant: str, lr: float, quant: str | None = None) -> ml_collections.ConfigDict:
    """Variant `<base>_lora` (or `<base>_qlora` with `quant`): the config of variant `<base>` with its SFT stage
    trained through LoRA r 128 / alpha 256 (adapters at `lr`)."""
    c = get_config(variant.rsplit("_", 1)[0])
    c.variant = variant
    lora_stage(c.stages.sft, LORA_R128, lr=lr, quant=quant, grad_accum=LORA_GRAD_ACCUM)
    return c


# The LoRA recipes' 16 sequences of 2048 tokens per device (batch 128 on 8 devices) are taken one sequence at a time
# (16 accumulation steps, same global batch and update): with whole-layer remat this is what fits the 7B QLoRA step
# in 24 GB (benchmarks/README.md, "LoRA memory").
LORA_GRAD_ACCUM = 16


def lora_stage(st: ml_collections.ConfigDict, lora: dict, lr: float,
               base_dtype: str | None = "bfloat16", quant: str | None = None,
               grad_accum: int | None = None) -> ml_collections.ConfigDict:
    """Stage `st` with the LLM trained through adapters instead: the rule that trained `llm/...` now trains only its
    adapters (group 'lora' at `lr`, fp32 master weights) and freezes the base, stored in `base_dtype` (None: the
    model's param_dtype); every other group keeps its rule and rate. `quant` ("int8" / "int4", QLoRA): the adapted
    base kernels are stored quantised (uhd_jax.models.quant), quantised as the float checkpoint loads. The LLM's
    layers are rematerialised whole (`nothing_saveable`: only each layer's input is kept for the backward pass);
    `grad_accum` replaces the stage's accumulation steps."""
    rules = []
    for pattern, group in st.trainable:
        if group == "llm":
            rules += [("llm/.*lora_.*", "lora"), (pattern, "frozen")]
        else:
            rules.append((pattern, group))
    lrs = {g: v for g, v in dict(st.lrs).items() if g != "llm"}
    st.update(trainable=rules, lora=dict(lora, quant=quant) if quant else dict(lora))
    model = st.get("model")
    model = dict(model.to_dict() if hasattr(model, "to_dict") else model or {})
    if base_dtype:
        model["llm"] = dict(model.get("llm") or {}, param_dtype=base_dtype)
    st.model = dict(model, remat_policy="nothing_saveable")
    if grad_accum:
        st.grad_accum = grad_accum
    st.lrs = dict(lrs, lora=lr)
    return st
