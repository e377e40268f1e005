"""Answer questions with a trained model: prompts from the training templates, left-padded batches, greedy decoding
with the KV cache, exact-match scoring. (The full benchmark suite and its official scorers arrive with issue #7.)"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from uhd_jax.data.uhd_images import fill_row
from uhd_jax.eval.generate import greedy_generate
from uhd_jax.models.vlm import VLM


def normalize_answer(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".").strip()


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def left_pad(prompts: list[dict], length: int, max_images: int, image_size: int, fixed_images: bool = True):
    b = len(prompts)
    ids = np.zeros((b, length), np.int32)
    valid = np.zeros((b, length), bool)
    image_map = np.full((b, length), -1, np.int32)
    pixels = np.zeros((b, max_images, image_size, image_size, 3), np.float32)
    for i, p in enumerate(prompts):
        n = len(p["ids"])
        if n > length:
            raise ValueError(f"prompt of {n} tokens exceeds the generation budget of {length}")
        ids[i, length - n:] = p["ids"]
        valid[i, length - n:] = True
        image_map[i, length - n:] = p["image_map"]
        if fixed_images:
            pixels[i, :len(p["pixels"])] = p["pixels"]
    return ids, valid, image_map, pixels


def packed_pixels(prompts: list[dict], layout) -> dict:
    """UHD prompts: each prompt's slices and overviews packed into its row (see `uhd_jax.data.uhd_images`)."""
    out = layout.zeros(len(prompts))
    for row, p in enumerate(prompts):
        fill_row(out, row, list(p["pixels"]), layout)
    return {k: jnp.asarray(v) for k, v in out.items()}


def answer_prompts(cfg, params, prompts: list[dict], tokenizer, *, batch_size: int = 32, max_new_tokens: int = 16,
                   prompt_length: int | None = None, max_images: int = 1, packed_layout=None) -> list[str]:
    """Decode an answer for each prompt. All batches share one padded length: one compilation for the whole set.

    UHD models (`cfg.packed_images`) need `packed_layout` (e.g. `uhd_jax.train.trainer.packed_layout(config, cfg)`)."""
    if cfg.packed_images and packed_layout is None:
        raise ValueError("this model reads packed UHD slices: pass packed_layout=trainer.packed_layout(config, cfg)")
    model = VLM(cfg)
    length = prompt_length or max(len(p["ids"]) for p in prompts)
    embed = jax.jit(lambda p, ids, valid, px, m: model.apply({"params": p}, ids, valid, jnp.zeros_like(ids), px, m,
                                                            method=VLM.embed_image_and_text)[:2])
    eos = tokenizer.eos_token_id
    answers = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # keep the batch shape static
        ids, valid, image_map, pixels = left_pad(chunk, length, max_images * cfg.views_per_image,
                                                 cfg.vision.image_size, fixed_images=not cfg.packed_images)
        images = packed_pixels(chunk, packed_layout) if cfg.packed_images else jnp.asarray(pixels)
        # SliME's router may drop image tokens: the LLM gets the updated mask (positions follow from it)
        embeds, valid = embed(params, jnp.asarray(ids), jnp.asarray(valid), images, jnp.asarray(image_map))
        tokens = np.asarray(greedy_generate({"params": params["llm"]}, cfg.llm, embeds, valid,
                                            max_new_tokens=max_new_tokens, eos_id=eos, pad_id=eos))
        for row in tokens[:len(prompts) - start]:
            cut = list(row).index(eos) if eos in row else len(row)
            answers.append(tokenizer.decode(row[:cut].tolist(), skip_special_tokens=True).strip())
    return answers[:len(prompts)]
