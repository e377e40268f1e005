"""LLaVAR (spec llava15_slime_llavar.md §D): the LLaVA v1 code base with a linear projector and `<im_start>` + 576
`<im_patch>` + `<im_end>` written into the text, CLIP-L/336 layer -2, images padded to square, the `llavar_v1`
template (its system prompt's missing spaces kept, `<image>` left where the data put it).

Vocabulary = Vicuna's 32000 + `<im_patch>`, `<im_start>`, `<im_end>` (32000-32002): the tokenizer is extended when it
lacks them and the init checkpoint's embedding and lm_head grow by rows equal to the mean of the old rows.
Stages (README of the original):
  pretrain  595K CC3M captions + 422K noisy-OCR instructions, lr 2e-3, batch 128 (8 x 8 x accum 2), max length 1024:
            the projector and only the <im_start>/<im_end> embedding rows learn (the original detaches every other
            text position; <im_patch> rows are overwritten by image features)
  sft       158K LLaVA-Instruct + 16K LLaVAR-Instruct, everything but CLIP, lr 2e-5, 3 epochs, batch 32, max 2048
Both cosine, warmup 0.03, no weight decay. Variants: `13b` (default, Vicuna-13B v1.1), `7b`, `tiny` (tests),
`13b_tiny` (the 13b recipe at `tiny`'s sizes: the README's commands at test size).

  uhd-convert import --src data/checkpoints/vicuna-13b-v1.1/ \\
      --vision data/checkpoints/clip-vit-large-patch14-336/ \\
      --config configs/llavar.py:13b --out data/checkpoints/llavar-13b-init
  uhd-train --config configs/llavar.py:13b --workdir runs/llavar-13b
A released checkpoint (SALT-NLP/LLaVAR, merged) imports with its three extra rows:
  uhd-convert import --src LLaVAR-13b/ \\
      --vision data/checkpoints/clip-vit-large-patch14-336/ \\
      --config configs/llavar.py:13b --out data/checkpoints/llavar-13b
Expected (spec §D, recomputed from the released answer files, containment accuracy): TextVQA 50.5, ST-VQA 40.0,
OCR-VQA 27.0, DocVQA 12.9; MME OCR 80.0 (LLaVA 50.0).
"""
from __future__ import annotations

from uhd_jax.configs import common

EXTRA_TOKENS = ("<im_patch>", "<im_start>", "<im_end>")
VARIANTS = ("13b", "7b", "tiny", "13b_tiny")


def get_config(arg: str | None = None):
    variant = arg or "13b"
    if variant == "13b_tiny":   # the tiny LLM's vocabulary + the three tokens, as 32000 + 3
        llm = dict(common.TINY_LLM, vocab_size=common.TINY_LLM["vocab_size"] + len(EXTRA_TOKENS))
        return common.tiny_recipe(get_config("13b"), variant, max_length=160, llm=llm)
    if variant not in VARIANTS:
        raise ValueError(f"configs/llavar.py: unknown variant {variant!r}; choose one of {list(VARIANTS)}")
    tiny = variant == "tiny"
    llm = common.choose_llm("configs/llavar.py", variant)
    if not tiny:
        llm.update(vocab_size=32000 + len(EXTRA_TOKENS), max_position_embeddings=2048)   # Vicuna v1.1: 2048
    c = common.base_config(common.TINY_VISION if tiny else common.CLIP_L_336, llm, projector_type="linear",
                           tiny=tiny)
    c.family = "llavar"
    c.variant = variant
    c.tokenizer = "synthetic/tokenizer" if tiny else f"checkpoints/vicuna-{variant}-v1.1"
    c.data.update(image_aspect_ratio="pad", extra_tokens=EXTRA_TOKENS, slot_token="<im_patch>",
                  image_prefix_tokens=("<im_start>",), image_suffix_tokens=("<im_end>",))
    init = [] if tiny else [f"checkpoints/llavar-{variant}-init"]
    c.stage_order = ("pretrain", "sft")
    c.stages = {
        "pretrain": common.stage(
            template="llavar_v1", init_checkpoints=init, grow_vocab=True,
            sources=[dict(json="LLaVA-CC3M-Pretrain-595K/chat.json", image_folder="LLaVA-CC3M-Pretrain-595K/images"),
                     dict(json="LLaVAR/pretrain/chat_llavar.json", image_folder="LLaVAR/pretrain/images")],
            trainable=[("projector/.*", "projector"), ("llm/embed_tokens/embedding", "projector"), (".*", "frozen")],
            trainable_token_rows=("<im_start>", "<im_end>"), lrs={"projector": 2e-3},
            batch_size=128, grad_accum=2, max_length=1024),
        "sft": common.stage(
            template="llavar_v1", init_from_stage="pretrain",
            sources=[dict(json="llava_instruct_158k.json", image_folder="coco/train2017"),
                     dict(json="LLaVAR/finetune/llava_instruct_150k_llavar_16k.json",
                          image_folder="LLaVAR/finetune/images")],
            trainable=[("vision/.*", "frozen"), ("projector/.*", "projector"), ("llm/.*", "llm")],
            lrs={"projector": 2e-5, "llm": 2e-5}, batch_size=32, num_epochs=3.0, max_length=2048),
    }
    if tiny:
        c.data.num_workers = 0
        for name, js in (("pretrain", "train_pretrain.json"), ("sft", "train_sft.json")):
            c.stages[name].update(sources=[dict(json=f"synthetic/{js}", image_folder="synthetic/images")],
                                  batch_size=8, grad_accum=1, max_length=160, save_every=100)
    return c
