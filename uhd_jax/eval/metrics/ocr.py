"""OCRBench's containment rule (MultimodalOCR's scoring scripts): a question scores 1 when one of its answers, with
newlines turned into spaces, occurs in the prediction. HME100k (handwritten formulas) also drops every space and is
case-sensitive; every other source is compared lower-cased and stripped. The benchmark's score is the count of
questions right (of 1000), reported per category too."""
from __future__ import annotations

from typing import Sequence


def ocrbench_correct(prediction: str, answers: Sequence[str] | str, dataset_name: str) -> bool:
    answers = [answers] if isinstance(answers, str) else list(answers)
    if dataset_name == "HME100k":
        pred = prediction.strip().replace("\n", " ").replace(" ", "")
        return any(str(a).strip().replace("\n", " ").replace(" ", "") in pred for a in answers)
    pred = prediction.lower().strip().replace("\n", " ")
    return any(str(a).lower().strip().replace("\n", " ") in pred for a in answers)
