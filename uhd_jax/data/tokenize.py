"""Tokenize a rendered conversation chunk-wise around `<image>` and derive the learned tokens from token spans.

As the originals' `tokenizer_image_token`: the prompt is split on `<image>`, each chunk is tokenized on its own (only
the first adds BOS), and one image placeholder (-200) sits between chunks. Every token's character span (offset
mapping of a fast tokenizer) is checked against the template's segments: a token is learned iff its span lies in a
learned segment. A token that straddles a learned/ignored boundary, or a learned segment that yields no token, is a
tokenization mismatch: the sample is skipped and counted, never trained with zeroed labels.
"""
from __future__ import annotations

import bisect
import dataclasses

import numpy as np

from uhd_jax.data.templates import IMAGE_TOKEN

IMAGE_PLACEHOLDER = -200


class TokenizationMismatch(ValueError):
    pass


@dataclasses.dataclass
class Tokenized:
    ids: np.ndarray      # int32, IMAGE_PLACEHOLDER where an image goes
    learned: np.ndarray  # bool, token is a supervised target


def _segment_bounds(segments):
    """Character intervals [start, end) of the learned segments, and all segment boundaries."""
    learned, boundaries, pos = [], [], 0
    for text, is_learned in segments:
        if is_learned:
            learned.append((pos, pos + len(text)))
        pos += len(text)
        boundaries.append(pos)
    return learned, boundaries[:-1]


def special_prefix(tokenizer) -> list[int]:
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    if with_special[len(with_special) - len(without):] != without:
        raise ValueError("tokenizer adds special tokens after the text; uhd-jax expects at most a prefix (BOS)")
    return with_special[:len(with_special) - len(without)]


def tokenize_segments(tokenizer, segments: list[tuple[str, bool]]) -> Tokenized:
    text = "".join(t for t, _ in segments)
    learned_ranges, boundaries = _segment_bounds(segments)
    # What the tokenizer puts in front of a text (BOS for Llama/Vicuna/Llama-3, nothing for Qwen2): the first chunk
    # gets it, later chunks do not (the original strips their BOS).
    prefix = special_prefix(tokenizer)
    ids, spans, added = list(prefix), [(0, 0)] * len(prefix), [True] * len(prefix)
    base = 0
    for i, chunk in enumerate(text.split(IMAGE_TOKEN)):
        if i > 0:
            ids.append(IMAGE_PLACEHOLDER)
            spans.append((base - len(IMAGE_TOKEN), base))
            added.append(True)
        if chunk:
            enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
            ids += enc["input_ids"]
            spans += [(base + s, base + e) for s, e in enc["offset_mapping"]]
            added += [False] * len(enc["input_ids"])
        base += len(chunk) + len(IMAGE_TOKEN)

    learned = np.zeros(len(ids), bool)
    hit = [0] * len(learned_ranges)
    starts = [a for a, _ in learned_ranges]
    for t, ((s, e), is_added) in enumerate(zip(spans, added)):
        if is_added:
            continue
        for b in boundaries:
            if s < b < e:
                raise TokenizationMismatch(
                    f"token {t} ({tokenizer.convert_ids_to_tokens(ids[t]) if ids[t] >= 0 else IMAGE_TOKEN!r}, "
                    f"chars {s}-{e}: {text[s:e]!r}) straddles a learned/ignored boundary at char {b}")
        k = bisect.bisect_right(starts, s) - 1
        if k >= 0 and s < learned_ranges[k][1] and e > s:
            learned[t] = True
            hit[k] += 1
    for k, n in enumerate(hit):
        if n == 0:
            a, b = learned_ranges[k]
            raise TokenizationMismatch(f"learned text {text[a:b]!r} produced no token of its own")
    return Tokenized(np.asarray(ids, np.int32), learned)
