"""Scorers of the added benchmarks, on their annotation files as released (`benchmark_formats` names them). Each takes
the answer file's records and the annotation path and returns (metrics, scored pairs, unmatched answer ids).

Rules (the originals', quirks kept):
  scienceqa    LLaVA's eval_science_qa.py over the test split of pid_splits.json: an unanswered problem counts wrong;
               'img_accuracy' (the papers' SQA-IMG) is over the answered problems that have an image (the original
               tells image questions by the answer's prompt, so an unanswered one drops out of it).
  mmbench      circular: a question counts right only when every copy (index mod 1e6) is answered right; also the
               plain accuracy of the original rows and the circular accuracy per category.
  seed         LLaVA's convert_seed_for_submission.py: the answer text must equal the letter exactly (no stripping);
               accuracy pooled over the image questions, unanswered ones wrong.
  mmmu         MMMU's parse_multi_choice_response / parse_open_response / eval_open; accuracy over answered questions.
  ocrbench     MultimodalOCR's containment rule; the score is the count right (of 1000), per category too.
  realworldqa  lmms-eval's exact_match: answer lower-cased, stripped, one trailing '.' run removed, equal to the target.
  hrbench      the option read as MMBench's; per category (single = FSP, cross = FCP) and overall, the mean over
               cycle_category groups of their accuracy, as lmms-eval's hrbench_aggregate_results.
  vizwiz       VQA soft accuracy on the 10 answers of val.json (the EvalAI normaliser; 'unanswerable' is an answer
               like the others), per answer_type too.
"""
from __future__ import annotations

import ast
import collections
import os
import random

from uhd_jax.cli_errors import UserError
from uhd_jax.eval.benchmark_formats import (CIRCULAR, _read_json_or_lines, mmbench_records, mmb_options,
                                            mmmu_choice_letter, read_tsv)
from uhd_jax.eval.metrics.choice import infer_option, mmmu_open_correct, mmmu_open_parse, sqa_choice
from uhd_jax.eval.metrics.normalize import normalize_answer
from uhd_jax.eval.metrics.ocr import ocrbench_correct
from uhd_jax.eval.metrics.vqa_accuracy import soft_accuracy


def _pct(right, total):
    return 100.0 * right / total if total else 0.0


def _by_group(scores: dict, overall: str, groups: str) -> dict:
    """{overall: % over every score, groups: {group: % over its scores}} from {group: [score (bool or 0-1)]}."""
    every = [x for v in scores.values() for x in v]
    return {overall: _pct(sum(every), len(every)),
            groups: {g: _pct(sum(v), len(v)) for g, v in sorted(scores.items())}}


def _by_id(answers):
    return {str(a["question_id"]): a for a in answers}


def _unmatched(answers, known):
    return [a["question_id"] for a in answers if str(a["question_id"]) not in known]


def score_scienceqa(answers, folder):
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: give the ScienceQA folder holding problems.json and pid_splits.json")
    problems = _read_json_or_lines(os.path.join(folder, "problems.json"))
    split = _read_json_or_lines(os.path.join(folder, "pid_splits.json"))["test"]
    preds = _by_id(answers)
    right = img_right = img_total = 0
    pairs = []
    for pid in split:
        prob = problems[pid]
        a = preds.get(str(pid))
        ok = a is not None and sqa_choice(a["text"], len(prob["choices"])) == prob["answer"]
        right += ok
        if a is not None:
            pairs.append((a, prob))
            if prob.get("image"):
                img_total += 1
                img_right += ok
    return ({"accuracy": _pct(right, len(split)), "img_accuracy": _pct(img_right, img_total)}, pairs,
            _unmatched(answers, {str(p) for p in split}))


def score_mmbench(answers, tsv):
    records = [r for r in mmbench_records(tsv) if r.get("answer") in r["options"]]
    if not records:
        raise UserError(f"{tsv}: no row has an answer among its options (a test split?); MMBench's test answers are "
                        f"scored by its server")
    preds = _by_id(answers)
    groups = collections.defaultdict(list)
    pairs = []
    for r in records:
        a = preds.get(str(r["index"]))
        ok = a is not None and infer_option(a["text"], r["options"]) == r["answer"]
        groups[r["index"] % CIRCULAR].append((ok, r))
        if a is not None:
            pairs.append((a, r))
    circular = {k: all(ok for ok, _ in rows) for k, rows in groups.items()}
    firsts = [ok for rows in groups.values() for ok, r in rows if r["index"] < CIRCULAR]
    by_cat = collections.defaultdict(list)
    for k, rows in groups.items():
        by_cat[rows[0][1].get("category", "all")].append(circular[k])
    return ({"circular_accuracy": _pct(sum(circular.values()), len(circular)),
             "vanilla_accuracy": _pct(sum(firsts), len(firsts)),
             "categories": {c: _pct(sum(v), len(v)) for c, v in sorted(by_cat.items())}},
            pairs, _unmatched(answers, {str(r["index"]) for r in records}))


def score_seed(answers, path):
    data = _read_json_or_lines(path)
    questions = [q for q in data["questions"] if q.get("data_type") == "image"]
    names = {v: k for k, v in data.get("question_type", {}).items()}
    preds = _by_id(answers)
    by_type = collections.defaultdict(list)
    pairs = []
    for q in questions:
        a = preds.get(str(q["question_id"]))
        by_type[names.get(q["question_type_id"], str(q["question_type_id"]))].append(
            a is not None and a["text"] == q["answer"])
        if a is not None:
            pairs.append((a, q))
    return (_by_group(by_type, "image_accuracy", "types"), pairs, _unmatched(answers, {str(q["question_id"]) for q in questions}))


def score_mmmu(answers, path):
    records = _read_json_or_lines(path)
    preds = _by_id(answers)
    rng = random.Random(42)   # the official module seeds `random` with 42 before any parse
    by_subject = collections.defaultdict(list)
    pairs = []
    for r in records:
        a = preds.get(str(r["id"]))
        if a is None:
            continue
        if r["question_type"] == "multiple-choice":
            ok = mmmu_choice_letter(r, a["text"], rng) == r["answer"]
        else:
            gold = r["answer"]
            if isinstance(gold, str) and gold.startswith("["):   # a list of accepted answers, as its repr
                try:
                    gold = ast.literal_eval(gold)
                except (ValueError, SyntaxError):
                    pass
            ok = mmmu_open_correct(gold, mmmu_open_parse(a["text"]))
        subject = "_".join(str(r["id"]).split("_")[1:-1]) or "all"
        by_subject[subject].append(ok)
        pairs.append((a, r))
    return (_by_group(by_subject, "accuracy", "subjects"), pairs, _unmatched(answers, {str(r["id"]) for r in records}))


def score_ocrbench(answers, path):
    records = _read_json_or_lines(path)
    preds = _by_id(answers)
    by_type = collections.Counter()
    pairs = []
    for r in records:
        a = preds.get(str(r["id"]))
        if a is not None:
            by_type[r["type"]] += ocrbench_correct(a["text"], r["answers"], r["dataset_name"])
            pairs.append((a, r))
    return ({"score": float(sum(by_type.values())), "types": dict(sorted(by_type.items()))}, pairs,
            _unmatched(answers, {str(r["id"]) for r in records}))


def score_realworldqa(answers, path):
    records = _read_json_or_lines(path)
    preds = _by_id(answers)
    oks, pairs = [], []
    for i, r in enumerate(records):
        a = preds.get(str(i))
        if a is not None:
            oks.append(a["text"].lower().strip().rstrip(".") == str(r["answer"]).lower().strip())
            pairs.append((a, r))
    return {"accuracy": _pct(sum(oks), len(oks))}, pairs, _unmatched(answers, {str(i) for i in range(len(records))})


def score_hrbench(answers, tsv):
    rows = read_tsv(tsv)
    preds = _by_id(answers)
    cells = collections.defaultdict(lambda: collections.defaultdict(list))
    pairs = []
    for r in rows:
        a = preds.get(str(int(r["index"])))
        if a is None:
            continue
        ok = infer_option(a["text"], mmb_options(r)) == r["answer"]
        for group in (r["category"], "average"):
            cells[group][r.get("cycle_category", "")].append(ok)
        pairs.append((a, r))

    def cycle_mean(by_cycle):
        return sum(_pct(sum(v), len(v)) for v in by_cycle.values()) / len(by_cycle) if by_cycle else 0.0
    names = {"single": "FSP", "cross": "FCP"}
    metrics = {names.get(c, c): cycle_mean(v) for c, v in sorted(cells.items())}
    return ({**metrics, "average": cycle_mean(cells["average"])},
            pairs, _unmatched(answers, {str(int(r["index"])) for r in rows}))


def score_vizwiz(answers, path):
    records = _read_json_or_lines(path)
    if not records or "answers" not in records[0]:
        raise UserError(f"{path}: no 'answers' (the test split?); uhd-evaluate writes its upload file for VizWiz's "
                        f"EvalAI server instead")
    preds = _by_id(answers)
    by_type = collections.defaultdict(list)
    pairs = []
    for r in records:
        a = preds.get(str(r["image"]))
        if a is not None:
            by_type[r.get("answer_type", "all")].append(
                soft_accuracy(a["text"], [x["answer"] if isinstance(x, dict) else x for x in r["answers"]]))
            pairs.append((a, r))
    return (_by_group(by_type, "accuracy", "answer_types"), pairs, _unmatched(answers, {str(r["image"]) for r in records}))


def vizwiz_submission(answers, questions_path_or_records) -> list[dict]:
    """VizWiz's upload format, as LLaVA's convert_vizwiz_for_submission.py: [{image, answer}] with the EvalAI answer
    processor applied, one entry per question of the split (every one must be answered)."""
    records = (_read_json_or_lines(questions_path_or_records) if isinstance(questions_path_or_records, str)
               else questions_path_or_records)
    preds = _by_id(answers)
    missing = [r["image"] for r in records if str(r["image"]) not in preds]
    if missing:
        raise UserError(f"{len(missing)} VizWiz question(s) unanswered (e.g. {missing[:3]}); the server needs all")
    return [{"image": r["image"], "answer": normalize_answer(preds[str(r["image"])]["text"])} for r in records]


def seed_submission(answers, path) -> list[dict]:
    """SEED-Bench's leaderboard lines, as LLaVA's convert_seed_for_submission.py: {question_id, prediction} for each
    answered image question, in the annotation file's order."""
    preds = _by_id(answers)
    return [{"question_id": q["question_id"], "prediction": preds[str(q["question_id"])]["text"]}
            for q in _read_json_or_lines(path)["questions"] if str(q["question_id"]) in preds]


EXTRA_SCORERS = {"scienceqa": (score_scienceqa, "img_accuracy"), "mmbench": (score_mmbench, "circular_accuracy"),
                 "mmbench_cn": (score_mmbench, "circular_accuracy"), "seed": (score_seed, "image_accuracy"),
                 "mmmu": (score_mmmu, "accuracy"), "ocrbench": (score_ocrbench, "score"),
                 "realworldqa": (score_realworldqa, "accuracy"), "hrbench4k": (score_hrbench, "average"),
                 "hrbench8k": (score_hrbench, "average"), "vizwiz": (score_vizwiz, "accuracy")}
