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

from uhd_jax.cli_errors import UserError
from uhd_jax.data.image_processing import llava15_image, normalize
from uhd_jax.data.images import SampleError, load_image
from uhd_jax.data.slicing import SlicingOptions, slime_global_view, slime_tiles
from uhd_jax.data.templates import TemplateError, count_images, get_template
from uhd_jax.data.tokenize import IMAGE_PLACEHOLDER, TokenizationMismatch, tokenize_segments
from uhd_jax.data.uhd_images import check_images, sliced_images
from uhd_jax.models.projectors.slime import slime_feature_rows
from uhd_jax.models.spatial_schema import image_layout


def load_tokenizer(path: str, extra_tokens: tuple = ()):
    """The HF tokenizer at `path`, with `extra_tokens` added as special tokens (in order) where it lacks them, as the
    originals extend theirs (LLaVAR: <im_patch>, <im_start>, <im_end> -> ids 32000-32002 on Vicuna)."""
    from transformers.models.auto.tokenization_auto import AutoTokenizer  # lazy: a top-level import fails in Grain
    # worker processes

    tok = AutoTokenizer.from_pretrained(path)
    missing = [t for t in extra_tokens if t not in tok.get_vocab()]
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    return tok


def read_samples(path: str) -> list:
    """Load a LLaVA JSON file; the file as a whole must be a UTF-8 JSON list (per-sample problems are skipped
    later). Anything else is the user's to fix, so it is a UserError naming the file."""
    if not os.path.isfile(path):
        state = "is a directory, not a file" if os.path.isdir(path) else "not found"
        raise UserError(f"data file {path}: {state}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")   # a BOM is harmless; any other non-UTF-8 byte is not
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"data file {path} is not UTF-8: byte 0x{raw[e.start]:02x} at byte offset {e.start} (line "
                        f"{line}) cannot be decoded ({e.reason}); re-encode the file as UTF-8 (e.g. iconv -f latin1 "
                        f"-t utf-8)") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"data file {path} is not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise UserError(f"data file {path}: expected a JSON list of samples, got {type(data).__name__}")
    return data


def sample_id(sample: Any, index: int, source: str = "") -> str:
    """The sample's own id, else its position in its file (`file.json#12`): a position counted across epochs or a
    mixture would name a different sample on every pass."""
    if isinstance(sample, dict) and sample.get("id") is not None:
        return str(sample["id"])
    return f"{os.path.basename(source)}#{index}"


def _check_text(value: str, where: str) -> None:
    """JSON's \\uD800-\\uDFFF escapes decode to lone surrogates that no tokenizer or file can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SampleError(f"{where} holds invalid Unicode: a lone surrogate U+{ord(value[e.start]):04X} at character "
                          f"{e.start} (an unpaired \\u escape in the JSON); fix or drop the text", "schema") from None


def check_schema(sample: Any) -> tuple[list[dict], list[str]]:
    """(conversations, image paths) or SampleError naming the bad field."""
    if not isinstance(sample, dict):
        raise SampleError(f"sample is a {type(sample).__name__}, expected an object", "schema")
    conv = sample.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise SampleError("'conversations' must be a non-empty list", "schema")
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in (
                "human", "gpt"):
            raise SampleError(f"conversations[{i}] must be {{'from': 'human'|'gpt', 'value': str}}, got {turn!r:.80}",
                              "schema")
        _check_text(turn["value"], f"conversations[{i}].value")
    image = sample.get("image")
    if image is None:
        images = []
    elif isinstance(image, str):
        images = [image]
    elif isinstance(image, list) and all(isinstance(x, str) for x in image):
        images = list(image)
    else:
        raise SampleError(f"'image' must be a string or a list of strings, got {type(image).__name__}", "schema")
    for k, path in enumerate(images):
        _check_text(path, f"image[{k}]")
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
    # UHD image path (image_mode 'uhd'): slicing, spatial schema, and the packed budget checked per sample.
    image_mode: str = "fixed"
    slicing: SlicingOptions = SlicingOptions()
    schema: str = "v1"
    separator_ids: tuple = ((",", 29892), ("\n", 13))
    query_grid: int = 12
    packed: Any = None                    # uhd_images.PackedLayout: checked per sample, so collation never fails
    seed: int = 0                         # the slicing augmentation's stream, per sample index
    slime: Any = None                     # image_mode 'slime': the model's SlimeConfig (views, tiles, grids)
    extra_tokens: tuple = ()              # added to the tokenizer where missing (LLaVAR's image tokens)
    source: str = ""                      # the data file: names samples without an id (`file.json#12`)

    def __post_init__(self):
        self._tokenizer = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokenizer"] = None
        return state

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path, self.extra_tokens)
        return self._tokenizer

    def __call__(self, index_and_sample, stats: dict | None = None) -> dict:
        """(index, sample) or (index, sample, position in its file); `index` seeds the augmentation (the pipeline
        passes one that differs per epoch), the position names a sample without an id. `stats`: filled with what
        the preparation saw (see `prepare`) and, for a skip, its `kind`."""
        index, sample, *position = index_and_sample
        sid = sample_id(sample, position[0] if position else index, self.source)
        try:
            return {"id": sid, "index": index, **self.prepare(sample, index, stats)}
        except (SampleError, TemplateError, TokenizationMismatch) as e:
            kind = {SampleError: "bad sample", TemplateError: "template", TokenizationMismatch: "tokenization "
                    "mismatch"}[type(e)]
            if stats is not None:
                stats["kind"] = getattr(e, "kind", kind)
            return {"id": sid, "index": index, "skip": f"{kind}: {e}"}

    def prepare(self, sample: dict, index: int | None = None, stats: dict | None = None) -> dict:
        """The sample's arrays, or SampleError / TemplateError / TokenizationMismatch. `stats` (a dict, for
        uhd-check-data) receives, as far as preparation got: `image_sizes` [(w, h)] of the files, `slices`
        per image (UHD slices, SliME tiles), `length` (tokens before truncation, image tokens included),
        `image_tokens`, `truncated`."""
        stats = {} if stats is None else stats
        conv, image_paths = check_schema(sample)
        template = get_template(self.template)
        n_placeholders = count_images(conv)
        if template.style == "plain" and len(image_paths) != 1:
            raise SampleError(f"plain (pretraining) samples need exactly one image, this one has {len(image_paths)}",
                              "image count")
        if n_placeholders != len(image_paths):
            raise SampleError(f"conversation has {n_placeholders} <image> placeholder(s) but the sample has "
                              f"{len(image_paths)} image(s)", "image count")
        if len(image_paths) > self.max_images:
            raise SampleError(f"sample has {len(image_paths)} images, more than data.max_images={self.max_images}",
                              "image count")
        segments = template.segments(conv)
        tok = tokenize_segments(self.tokenizer, segments)
        pixels, layouts, pixel_valid = self._images(image_paths, index, stats)
        ids, learned, image_map = self._expand_images(tok.ids, tok.learned, layouts)
        stats.update(length=len(ids), image_tokens=int((image_map >= 0).sum()))
        truncated = len(ids) > self.max_length
        stats["truncated"] = truncated
        if truncated:
            slots = np.flatnonzero(image_map >= 0)
            if len(slots) and slots[-1] >= self.max_length:
                raise SampleError(f"image tokens would be cut: the sequence is {len(ids)} tokens and its last image "
                                  f"token sits at {slots[-1]}, beyond data.max_length={self.max_length}",
                                  "image tokens beyond max_length")
            ids, learned, image_map = ids[:self.max_length], learned[:self.max_length], image_map[:self.max_length]
        if not learned[1:].any():
            raise SampleError(f"no supervised token within data.max_length={self.max_length}", "no supervised token")
        out = {"ids": ids, "learned": learned, "image_map": image_map, "pixels": pixels, "truncated": truncated}
        if pixel_valid is not None:
            out["pixel_valid"] = pixel_valid
        return out

    def prompt(self, sample: dict, turn: int = 0) -> dict:
        """The generation prompt for human turn `turn` (earlier turns included) and its reference answer."""
        conv, image_paths = check_schema(sample)
        if 2 * turn + 1 >= len(conv):
            raise SampleError(f"sample has no answer for turn {turn}")
        segments = get_template(self.template).segments(conv[:2 * turn + 1], add_generation_prompt=True)
        tok = tokenize_segments(self.tokenizer, segments)
        pixels, layouts, _ = self._images(image_paths, None)
        ids, _, image_map = self._expand_images(tok.ids, tok.learned, layouts)
        return {"ids": ids, "image_map": image_map, "answer": conv[2 * turn + 1]["value"], "pixels": pixels}

    def _load(self, path, stats: dict | None = None):
        image = load_image(os.path.join(self.image_folder, path), max_pixels=self.max_image_pixels,
                           min_area=self.min_image_area, alpha=self.alpha)
        if stats is not None:
            stats.setdefault("image_sizes", []).append(image.size)
        return image

    def _images(self, image_paths, index, stats: dict | None = None):
        """Pixels of the sample's images, per image its (token ids, feature rows) in the sequence, and which image
        slots are real (None: all of them).

        fixed: (n_images, S, S, 3) and `tokens_per_image` rows each between the optional prefix/suffix tokens.
        uhd:   a list of (H, W, 3) slices and overviews of varying sizes, laid out by the spatial schema.
        slime: (n_images * views_per_image, S, S, 3) global views and tiles (zeros past a grid's tiles), each
               image's feature rows in SliME's assembly order."""
        if self.image_mode == "slime":
            return self._slime_images(image_paths, stats)
        if self.image_mode == "fixed":
            pixels = [llava15_image(self._load(p, stats), self.image_size, self.image_aspect_ratio)
                      for p in image_paths]
            n = self.tokens_per_image
            pre, post = list(self.image_prefix_ids), list(self.image_suffix_ids)
            layouts = [(np.asarray(pre + [self.slot_id] * n + post, np.int32),
                        np.asarray([-1] * len(pre) + list(range(i * n, (i + 1) * n)) + [-1] * len(post), np.int32))
                       for i in range(len(image_paths))]
            stacked = np.stack(pixels) if pixels else np.zeros((0, self.image_size, self.image_size, 3), np.float32)
            return stacked, layouts, None
        if self.image_mode != "uhd":
            raise ValueError(f"unknown image_mode {self.image_mode!r}; choose 'fixed', 'uhd' or 'slime'")
        rng = None
        if self.slicing.augment_prob > 0 and index is not None:
            rng = np.random.default_rng([self.seed, index])
        pixels, layouts = [], []
        for p in image_paths:
            sliced, arrays = sliced_images(self._load(p, stats), self.slicing, p, rng)
            if stats is not None:
                stats.setdefault("slices", []).append(len(sliced.slices))
            ids, rows = image_layout(sliced.grid, sliced.separators, query_grid=self.query_grid, schema=self.schema,
                                     separator_ids=dict(self.separator_ids),
                                     first_row=len(pixels) * self.query_grid ** 2)
            pixels += arrays
            layouts.append((ids, rows))
        if self.packed is not None:
            try:
                check_images(pixels, self.packed)
            except ValueError as e:
                raise SampleError(str(e), "image budget") from None
        return pixels, layouts, None

    def _slime_images(self, image_paths, stats: dict | None = None):
        c, size = self.slime, self.image_size
        n = c.views_per_image
        pixels = np.zeros((len(image_paths) * n, size, size, 3), np.float32)
        valid = np.zeros(len(pixels), bool)
        layouts = []
        for k, p in enumerate(image_paths):
            image = self._load(p, stats).convert("RGB")
            if c.views == "global":   # runs 1a/1b read the global view alone: no letterboxed canvas to cut
                views, grid = [slime_global_view(image, size)], None
            else:
                global_view, tiles, grid = slime_tiles(image, size)
                if stats is not None:
                    stats.setdefault("slices", []).append(len(tiles))
                if len(tiles) > c.max_tiles:
                    raise SampleError(f"image {p} is cut into {len(tiles)} tiles, more than model.slime.max_tiles="
                                      f"{c.max_tiles}", "image budget")
                views = [global_view, *tiles]
            for j, view in enumerate(views):
                pixels[k * n + j] = normalize(view)
                valid[k * n + j] = True
            rows = slime_feature_rows(c, grid, first_row=k * c.rows_per_image)
            layouts.append((np.full(len(rows), self.slot_id, np.int32), rows))
        return pixels, layouts, valid

    def _expand_images(self, ids, learned, layouts):
        out_ids, out_learned, out_map = [], [], []
        image = 0
        for tok, lrn in zip(ids.tolist(), learned.tolist()):
            if tok != IMAGE_PLACEHOLDER:
                out_ids.append(tok)
                out_learned.append(lrn)
                out_map.append(-1)
                continue
            img_ids, img_rows = layouts[image]
            out_ids += img_ids.tolist()
            out_learned += [False] * len(img_ids)
            out_map += img_rows.tolist()
            image += 1
        return np.asarray(out_ids, np.int32), np.asarray(out_learned, bool), np.asarray(out_map, np.int32)
