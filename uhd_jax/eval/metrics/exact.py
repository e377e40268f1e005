"""Exact-match rules: GQA's prediction format (`text.rstrip('.').lower()`, spec §B.3), AI2D (strip + lower) and
ChartQA (EvalAI normalisation; the UHD eval has the relaxed-accuracy code commented out), spec uhd.md §8; and the
plain rule of the project's own synthetic questions (case, spacing and a final period ignored)."""
from __future__ import annotations

import re
from typing import Sequence

from uhd_jax.eval.metrics.normalize import normalize_answer


def gqa_prediction(text: str) -> str:
    return text.rstrip(".").lower()


def gqa_match(prediction: str, answer: str) -> bool:
    return gqa_prediction(prediction) == answer.lower()


def ai2d_match(prediction: str, answers: Sequence[str]) -> bool:
    return any(prediction.strip().lower() == a.strip().lower() for a in answers)


def chartqa_match(prediction: str, answers: Sequence[str]) -> bool:
    return any(normalize_answer(prediction) == normalize_answer(a) for a in answers)


def plain_normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".").strip()


def plain_match(prediction: str, answer: str) -> bool:
    return plain_normalize(prediction) == plain_normalize(answer)
