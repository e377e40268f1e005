"""DocVQA ANLS as the LLaVA-UHD eval computes it (spec uhd.md §8): against each reference, lower-cased and stripped,
similarity = 1 - edit distance / max length, 0 below 0.5; a question scores its best reference."""
from __future__ import annotations

from typing import Sequence


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, references: Sequence[str], threshold: float = 0.5) -> float:
    p = prediction.strip().lower()
    best = 0.0
    for ref in references:
        r = ref.strip().lower()
        length = max(len(p), len(r))
        sim = 1.0 - (levenshtein(p, r) / length if length else 0.0)
        best = max(best, sim if sim >= threshold else 0.0)
    return best
