"""Reading the chosen option out of a multiple-choice answer, one rule per original scorer, quirks kept.

ScienceQA (LLaVA's eval_science_qa.py): newlines become '. '; the stripped text if it is one of the letters A-E, else
the first letter when the text starts 'X. ', else 'The answer is X.' (then 'The answer is X') anywhere; a letter past
the question's choices, or nothing, is a failure (-1) and counts wrong.

MMBench / HR-Bench (VLMEvalKit's exact-matching stage, no LLM fallback): the characters .()[],:;!*#{} become spaces;
if exactly one option letter stands alone among the words, that letter (its article-'A' guard only acts in VERBOSE
mode); several letters, a lone 'Z' or one of its refusal phrases: nothing; else if exactly one option's text
(lower-cased) is contained in the lower-cased answer, that option; else nothing.

MMMU (its eval_utils.parse_multi_choice_response): the answer stripped of , . ! ? ; : ' at both ends and padded with
spaces; candidates are letters written '(X)', else ' X ', else (only for answers of more than 5 words) options whose
text occurs; several candidates: the one whose mark occurs last; none: a random letter (the official seed 42, drawn
in file order).
"""
from __future__ import annotations

import random
import re
from typing import Mapping, Sequence

SQA_LETTERS = ("A", "B", "C", "D", "E")


def sqa_choice(text: str, num_choices: int) -> int:
    """Index of the chosen option (0-based), -1 when none is read or it is past the question's choices."""
    pred = text.replace("\n", ". ")
    if pred.strip() in SQA_LETTERS:
        letter = pred.strip()
    elif len(pred) >= 3 and pred[0] in SQA_LETTERS and pred[1:3] == ". ":
        letter = pred[0]
    else:
        found = re.search(r"The answer is ([A-E])\.", pred) or re.search(r"The answer is ([A-E])", pred)
        letter = found.group(1) if found and "The answer is " in pred else None
    if letter is None or SQA_LETTERS.index(letter) >= num_choices:
        return -1
    return SQA_LETTERS.index(letter)


_MMB_SEPARATORS = ".()[],:;!*#{}"
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")


def infer_option(text: str, options: Mapping[str, str]) -> str | None:
    """The option letter an MMBench-style answer names (see the module doc), or None."""
    spaced = text
    for c in _MMB_SEPARATORS:
        spaced = spaced.replace(c, " ")
    words = [w.strip() for w in spaced.split()]
    named = [letter for letter in options if letter in words]
    if len(named) == 1:
        return named[0]
    if named or "Z" in words or any(r in text for r in _REFUSALS):   # VLMEvalKit's 'Z': no option, not read on
        return None
    lower = text.lower()
    contained = [letter for letter, option in options.items() if str(option).lower() in lower]
    return contained[0] if len(contained) == 1 else None


def mmmu_choice(response: str, letters: Sequence[str], index2ans: Mapping[str, str], rng: random.Random) -> str:
    for c in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(c)
    response = f" {response} "
    candidates = [c for c in letters if f"({c})" in response]
    marks = {c: f"({c})" for c in candidates}
    if not candidates:
        candidates = [c for c in letters if f" {c} " in response]
        marks = {c: f" {c} " for c in candidates}
    by_content = False
    if not candidates and len(response.split()) > 5:
        candidates = [c for c, ans in index2ans.items() if ans.lower() in response.lower()]
        by_content = True
    if not candidates:
        return rng.choice(list(letters))
    if len(candidates) == 1:
        return candidates[0]
    if by_content:
        where = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    else:
        where = [response.rfind(marks[c]) for c in candidates]
    return candidates[where.index(max(where))]   # argmax: the first of equal positions


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def mmmu_normalize(text: str) -> list:
    """A number rounded to 2 decimals, or the lower-cased string (a single character padded on either side, so that
    it only matches as a word)."""
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


_NUM_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUM_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUM_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")
_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")


def _key_subresponses(response: str) -> list[str]:
    response = response.strip().strip(".").lower()
    # sic: the split wants a capital after '. ', but the text is already lower-cased: only newlines split
    parts = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for i, part in enumerate(parts):
        indicators = _KEY_INDICATORS + (("=",) if i == len(parts) - 1 else ())
        shortest = None
        for ind in indicators:
            if ind in part:
                tail = part.split(ind)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
            keys.append(shortest)
    return keys or [response]


def mmmu_open_parse(response: str) -> list:
    """The official parse_open_response: key sub-responses and every number in them, normalised, deduplicated."""
    keys = _key_subresponses(response)
    preds = list(keys)
    for k in keys:
        preds += _NUM_COMMAS.findall(k) + _NUM_SCIENTIFIC.findall(k) + _NUM_SIMPLE.findall(k)
    out = []
    for p in preds:
        for n in mmmu_normalize(p):
            if n not in out:
                out.append(n)
    return out


def mmmu_open_correct(gold, parsed: list) -> bool:
    """A parsed string is right when a normalised gold string occurs in it; a parsed number when it equals one."""
    golds = []
    for g in (gold if isinstance(gold, list) else [gold]):
        golds += mmmu_normalize(str(g))
    for p in parsed:
        if isinstance(p, str):
            if any(isinstance(g, str) and g in p for g in golds):
                return True
        elif p in golds:
            return True
    return False
