"""Yes/no benchmarks (spec §B.4, B.5).

POPE: the answer's text before the first '.', commas deleted, split on spaces; 'no' if any word is 'No', 'not' or
'no', else 'yes'; confusion counts with 'yes' as the positive class, accuracy, precision, recall, F1, yes-ratio.
MME: lower-cased answer, exactly 'yes'/'no', else 'yes'/'no' within its first 4 characters, else 'other'; per subtask
100 * accuracy + 100 * accuracy+ (both questions of an image right); perception = the 10 perception subtasks' sum
(max 2000), cognition = the 4 cognition subtasks' (max 800).
"""
from __future__ import annotations

import collections
from typing import Iterable

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def pope_label(answer: str) -> str:
    words = answer.split(".")[0].replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def pope_scores(predictions: Iterable[str], labels: Iterable[str]) -> dict:
    tp = fp = tn = fn = 0
    for pred, label in zip(predictions, labels, strict=True):
        p, y = pope_label(pred) == "yes", label.strip().lower() == "yes"
        tp += p and y
        fp += p and not y
        tn += not p and not y
        fn += not p and y
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return dict(TP=tp, FP=fp, TN=tn, FN=fn, accuracy=(tp + tn) / n if n else 0.0, precision=precision,
                recall=recall, f1=f1, yes_ratio=(tp + fp) / n if n else 0.0)


def mme_label(answer: str) -> str:
    a = answer.lower()
    if a in ("yes", "no"):
        return a
    head = a[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def mme_scores(rows: Iterable[tuple[str, str, str, str]]) -> dict:
    """rows: (subtask, image file, ground truth 'Yes'/'No', prediction text) -> per-subtask scores and the sums."""
    by_task = collections.defaultdict(lambda: collections.defaultdict(list))
    for task, image, truth, pred in rows:
        by_task[task][image].append(mme_label(pred) == truth.strip().lower())
    out = {}
    for task, images in by_task.items():
        answers = [ok for oks in images.values() for ok in oks]
        acc = sum(answers) / len(answers)
        acc_plus = sum(all(oks) for oks in images.values()) / len(images)
        out[task] = 100 * acc + 100 * acc_plus
    out["perception"] = sum(out.get(t, 0.0) for t in MME_PERCEPTION)
    out["cognition"] = sum(out.get(t, 0.0) for t in MME_COGNITION)
    return out
