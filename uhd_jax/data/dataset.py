"""LLaVA-format JSON -> prepared examples, one sample at a time, with every failure a counted skip.

Input format (unchanged from the originals): a JSON list of `{"id", "image" (optional: str or list of str),
"conversations": [{"from": "human"|"gpt", "value": str}, ...]}` plus an image folder.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from uhd_jax.data.image_processing import llava15_image
from uhd_jax.data.images import SampleError, load_image
from uhd_jax.data.templates import TemplateError, count_images, get_template
from uhd_jax.data.tokenize import IMAGE_PLACEHOLDER, TokenizationMismatch, tokenize_segments


def read_samples(path: str) -> list[dict]:
    """Load a LLaVA JSON file; the file as a whole must be a list (per-sample problems are skipped later)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"data file {path} is not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise ValueError(f"data file {path}: expected a JSON list of samples, got {type(data).__name__}")
    return data


def sample_id(sample: Any, index: int) -> str:
    if isinstance(sample, dict) and sample.get("id") is not None:
        return str(sample["id"])
    return f"#{index}"


def check_schema(sample: Any) -> tuple[list[dict], list[str]]:
    """(conversations, image paths) or SampleError naming the bad field."""
    if not isinstance(sample, dict):
        raise SampleError(f"sample is a {type(sample).__name__}, expected an object")
    conv = sample.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise SampleError("'conversations' must be a non-empty list")
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in (
                "human", "gpt"):
            raise SampleError(f"conversations[{i}] must be {{'from': 'human'|'gpt', 'value': str}}, got {turn!r:.80}")
    image = sample.get("image")
    if image is None:
        images = []
    elif isinstance(image, str):
        images = [image]
    elif isinstance(image, list) and all(isinstance(x, str) for x in image):
        images = list(image)
    else:
        raise SampleError(f"'image' must be a string or a list of strings, got {type(image).__name__}")
    return conv, images


@dataclasses.dataclass
class SamplePreparer:
    """Turns one raw sample into arrays, or a skip reason. Picklable (Grain workers); the tokenizer loads lazily."""

    tokenizer_path: str
    image_folder: str
    template: str
    max_length: int
    tokens_per_image: int
    image_size: int
    max_images: int = 1
    image_aspect_ratio: str = "pad"
    slot_id: int = 0                      # id written at image slots (LLaVAR: <im_patch>)
    image_prefix_ids: tuple = ()          # LLaVAR: (<im_start>,)
    image_suffix_ids: tuple = ()          # LLaVAR: (<im_end>,)
    max_image_pixels: int = 89_478_485
    min_image_area: int = 16
    alpha: str = "drop"

    def __post_init__(self):
        self._tokenizer = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokenizer"] = None
        return state

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers.models.auto.tokenization_auto import AutoTokenizer  # lazy top-level import fails in
            # Grain worker processes

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        return self._tokenizer

    def __call__(self, index_and_sample) -> dict:
        index, sample = index_and_sample
        sid = sample_id(sample, index)
        try:
            return {"id": sid, "index": index, **self.prepare(sample)}
        except (SampleError, TemplateError, TokenizationMismatch) as e:
            kind = {SampleError: "bad sample", TemplateError: "template", TokenizationMismatch: "tokenization "
                    "mismatch"}[type(e)]
            return {"id": sid, "index": index, "skip": f"{kind}: {e}"}

    def prepare(self, sample: dict) -> dict:
        conv, image_paths = check_schema(sample)
        template = get_template(self.template)
        n_placeholders = count_images(conv)
        if template.style == "plain" and len(image_paths) != 1:
            raise SampleError(f"plain (pretraining) samples need exactly one image, this one has {len(image_paths)}")
        if n_placeholders != len(image_paths):
            raise SampleError(f"conversation has {n_placeholders} <image> placeholder(s) but the sample has "
                              f"{len(image_paths)} image(s)")
        if len(image_paths) > self.max_images:
            raise SampleError(f"sample has {len(image_paths)} images, more than data.max_images={self.max_images}")
        segments = template.segments(conv)
        tok = tokenize_segments(self.tokenizer, segments)
        pixels = self._pixels(image_paths)
        ids, learned, image_map = self._expand_images(tok.ids, tok.learned)
        truncated = len(ids) > self.max_length
        if truncated:
            slots = np.flatnonzero(image_map >= 0)
            if len(slots) and slots[-1] >= self.max_length:
                raise SampleError(f"image tokens would be cut: the sequence is {len(ids)} tokens and its last image "
                                  f"token sits at {slots[-1]}, beyond data.max_length={self.max_length}")
            ids, learned, image_map = ids[:self.max_length], learned[:self.max_length], image_map[:self.max_length]
        if not learned[1:].any():
            raise SampleError(f"no supervised token within data.max_length={self.max_length}")
        return {"ids": ids, "learned": learned, "image_map": image_map, "pixels": pixels, "truncated": truncated}

    def prompt(self, sample: dict, turn: int = 0) -> dict:
        """The generation prompt for human turn `turn` (earlier turns included) and its reference answer."""
        conv, image_paths = check_schema(sample)
        if 2 * turn + 1 >= len(conv):
            raise SampleError(f"sample has no answer for turn {turn}")
        segments = get_template(self.template).segments(conv[:2 * turn + 1], add_generation_prompt=True)
        tok = tokenize_segments(self.tokenizer, segments)
        ids, _, image_map = self._expand_images(tok.ids, tok.learned)
        return {"ids": ids, "image_map": image_map, "answer": conv[2 * turn + 1]["value"],
                "pixels": self._pixels(image_paths)}

    def _pixels(self, image_paths) -> np.ndarray:
        """(n_images, S, S, 3) normalised pixels of the sample's images, in order."""
        pixels = [llava15_image(load_image(os.path.join(self.image_folder, p), max_pixels=self.max_image_pixels,
                                           min_area=self.min_image_area, alpha=self.alpha),
                                self.image_size, self.image_aspect_ratio) for p in image_paths]
        return np.stack(pixels) if pixels else np.zeros((0, self.image_size, self.image_size, 3), np.float32)

    def _expand_images(self, ids, learned):
        out_ids, out_learned, out_map = [], [], []
        image = 0
        for tok, lrn in zip(ids.tolist(), learned.tolist()):
            if tok != IMAGE_PLACEHOLDER:
                out_ids.append(tok)
                out_learned.append(lrn)
                out_map.append(-1)
                continue
            out_ids += list(self.image_prefix_ids) + [self.slot_id] * self.tokens_per_image + list(
                self.image_suffix_ids)
            out_learned += [False] * (len(self.image_prefix_ids) + self.tokens_per_image + len(self.image_suffix_ids))
            out_map += [-1] * len(self.image_prefix_ids)
            out_map += list(range(image * self.tokens_per_image, (image + 1) * self.tokens_per_image))
            out_map += [-1] * len(self.image_suffix_ids)
            image += 1
        return np.asarray(out_ids, np.int32), np.asarray(out_learned, bool), np.asarray(out_map, np.int32)
