"""VQA soft accuracy (TextVQA, VQAv2; spec §B.2): every unique human answer a scores the mean, over the 10
leave-one-out subsets of the human answers, of min(1, matches of a in the subset / 3); a prediction scores its entry
after normalisation, else 0. An answer given by 3 of 10 humans scores 0.9, by 2 of 10 0.6, by >= 4 of 10 1.0."""
from __future__ import annotations

from typing import Sequence

from uhd_jax.eval.metrics.normalize import normalize_answer


def answer_scores(human_answers: Sequence[str]) -> dict[str, float]:
    answers = [normalize_answer(a) for a in human_answers]
    scores = {}
    for a in set(answers):
        per_subset = []
        for i in range(len(answers)):
            others = answers[:i] + answers[i + 1:]
            per_subset.append(min(1.0, sum(o == a for o in others) / 3.0))
        scores[a] = sum(per_subset) / len(per_subset)
    return scores


def soft_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    if not human_answers:
        raise ValueError("a VQA question needs its human answers")
    return answer_scores(human_answers).get(normalize_answer(prediction), 0.0)
