"""Score an answer file against a benchmark's annotations, with each benchmark's official matching and metric.

Annotation formats read (JSON, a JSON list, or JSON lines):
  textvqa  TextVQA_0.5.1_val.json (`data`: image_id, question, answers); matched as LLaVA's eval_textvqa.py does, by
           (question_id == image_id, the prompt's question line lower-cased). Records with question_id also work.
  vqav2    the official annotations (`annotations`: question_id, answers [{answer}]) or records with answers.
  gqa      testdev_balanced_questions.json ({question_id: {answer}}) or records with answer.
  docvqa, chartqa, ai2d   records with question_id and answer (the UHD eval jsonl) or answers.
  pope     coco_pope_*.json records with question_id and label (and category: scored per category).
  mme      the MME_Benchmark_release_version folder ({category}/[questions_answers_YN/]{image}.txt, lines
           "question<TAB>Yes|No"), matched as LLaVA's convert_answer_to_mme.py does; or records with question_id
           "category/image", answer.
  the added benchmarks (ScienceQA, MMBench, SEED, MMMU, OCRBench, RealWorldQA, HR-Bench, VizWiz) read their files as
           released: `uhd_jax.eval.extra_scoring`; LLaVA-Bench and MM-Vet are judged: `uhd_jax.eval.judge`.
"""
from __future__ import annotations

import collections
import json
import os

from uhd_jax.cli_errors import UserError
from uhd_jax.eval.benchmarks import BENCHMARKS, SHORT
from uhd_jax.eval.metrics.anls import anls
from uhd_jax.eval.metrics.exact import ai2d_match, chartqa_match, gqa_match
from uhd_jax.eval.metrics.vqa_accuracy import soft_accuracy
from uhd_jax.eval.metrics.yes_no import mme_scores, pope_scores


def load_records(path: str) -> list[dict]:
    """Annotation records from JSON (a list, a {data|annotations|questions: list} object, or {id: record}) or JSON
    lines; {id: record} entries get their key as question_id."""
    if not os.path.isfile(path):
        state = "is a directory" if os.path.isdir(path) else "not found"
        raise UserError(f"annotation file {path} {state}; give the benchmark's annotation file (JSON or JSON lines)")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"annotation file {path} is not text ({e.reason} at byte {e.start}); give the benchmark's "
                        f"annotation file (JSON or JSON lines)") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as whole:
        data = []
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError as e:
                # a JSON file broken inside fails as JSON lines on its first line: its own error says where
                where, error = (whole.lineno, whole) if lineno == 1 else (lineno, e)
                raise UserError(f"{path}:{where}: neither JSON nor JSON lines ({error.msg}); fix the file or give "
                                f"the benchmark's original annotation file") from None
    if isinstance(data, dict) and "question_id" in data:   # JSON lines with a single record
        return [data]
    if isinstance(data, dict):
        for key in ("data", "annotations", "questions"):
            if isinstance(data.get(key), list):
                return data[key]
        if data and all(isinstance(v, dict) for v in data.values()):
            return [{"question_id": k, **v} for k, v in data.items()]
        raise UserError(f"{path}: no list of records under 'data', 'annotations' or 'questions'; is this the "
                        f"benchmark's annotation file?")
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"{path}: expected a list of annotation records (JSON objects)")
    return data


def answers_of(record: dict) -> list[str]:
    """Reference answers of a record: 'answers' (strings or {answer} objects) or a single 'answer'/'label'."""
    if "answers" in record:
        return [a["answer"] if isinstance(a, dict) else str(a) for a in record["answers"]]
    for key in ("answer", "label"):
        if key in record:
            return [str(record[key])]
    raise UserError(f"annotation {record.get('question_id')!r} has no 'answers', 'answer' or 'label': is the "
                    f"annotation file the one of this benchmark?")


def textvqa_question(prompt: str) -> str:
    """The question line of a TextVQA prompt (LLaVA's prompt_processor), lower-cased."""
    lines = prompt.split("\n")
    if "Reference OCR token: " in prompt and len(lines) == 3:
        return (lines[1] if prompt.startswith("Reference OCR token:") else lines[0]).lower()
    return lines[0].lower()


def match(answers: list[dict], records: list[dict], key=None) -> tuple[list[tuple[dict, dict]], list]:
    """(answer, record) pairs by question_id (or `key`); answers without an annotation are returned apart."""
    if key is None:
        unnamed = next((r for r in records if "question_id" not in r), None)
        if unnamed is not None:
            raise UserError(f"an annotation record has no 'question_id' ({str(unnamed)[:80]}): is the annotation file "
                            f"the one of this benchmark?")
        key = lambda r: str(r["question_id"])  # noqa: E731
    table = {key(r): r for r in records}
    pairs, unmatched = [], []
    for a in answers:
        r = table.get(str(a["question_id"]))
        (pairs.append((a, r)) if r is not None else unmatched.append(a["question_id"]))
    return pairs, unmatched


def _textvqa_pairs(answers, records):
    if records and "image_id" in records[0] and "question" in records[0]:
        table = {(str(r["image_id"]), r["question"].lower()): r for r in records}
        _need_prompts(answers, "textvqa")
        pairs, unmatched = [], []
        for a in answers:
            r = table.get((str(a["question_id"]), textvqa_question(a["prompt"])))
            (pairs.append((a, r)) if r is not None else unmatched.append(a["question_id"]))
        return pairs, unmatched
    return match(answers, records)


def _need_prompts(answers, benchmark):
    """TextVQA and MME match an answer by its question text: the answer file's 'prompt'."""
    without = next((a for a in answers if not isinstance(a.get("prompt"), str)), None)
    if without is not None:
        raise UserError(f"{benchmark} matches answers by their question, but answer {without['question_id']!r} has no "
                        f"'prompt'; score an answer file written by uhd-generate (or LLaVA's model_vqa)")


def _mean(values):
    values = list(values)
    return 100.0 * sum(values) / len(values) if values else 0.0


def score_vqa(answers, records, textvqa=False):
    pairs, unmatched = (_textvqa_pairs if textvqa else match)(answers, records)
    return {"accuracy": _mean(soft_accuracy(a["text"], answers_of(r)) for a, r in pairs)}, pairs, unmatched


def score_per_question(fn):
    def score(answers, records):
        pairs, unmatched = match(answers, records)
        return {fn.__name__: _mean(fn(a["text"], answers_of(r)) for a, r in pairs)}, pairs, unmatched
    return score


def anls_score(prediction, references):
    return anls(prediction, references)


def accuracy(prediction, references):  # GQA: one reference
    return gqa_match(prediction, references[0])


def score_pope(answers, records):
    pairs, unmatched = match(answers, records)
    by_cat = collections.defaultdict(list)
    for a, r in pairs:
        by_cat[r.get("category", "all")].append((a["text"], answers_of(r)[0]))
    cats = {cat: pope_scores(*zip(*rows)) for cat, rows in sorted(by_cat.items())}
    # the headline is the mean over categories (adversarial, popular, random), as the papers report it
    return {**cats, "f1": _mean(v["f1"] for v in cats.values()),
            "accuracy": _mean(v["accuracy"] for v in cats.values())}, pairs, unmatched


def mme_ground_truth(folder: str) -> dict:
    """{(category, file.txt, question): 'Yes'|'No'} from the MME release folder."""
    gt = {}
    for category in sorted(os.listdir(folder)):
        cat_dir = os.path.join(folder, category)
        if not os.path.isdir(cat_dir):
            continue
        qa_dir = os.path.join(cat_dir, "questions_answers_YN")
        qa_dir = qa_dir if os.path.isdir(qa_dir) else cat_dir
        for name in sorted(os.listdir(qa_dir)):
            if name.endswith(".txt"):
                path = os.path.join(qa_dir, name)
                with open(path, encoding="utf-8", errors="replace") as f:
                    for lineno, line in enumerate(f, 1):
                        if line.strip():
                            fields = line.rstrip("\n").split("\t")
                            if len(fields) < 2:
                                raise UserError(f"{path}:{lineno}: expected 'question<TAB>Yes|No'; is {folder} the "
                                                f"MME_Benchmark_release_version folder?")
                            gt[(category, name, fields[0])] = fields[1].strip()
    return gt


def score_mme(answers, annotations_path):
    rows, unmatched = [], []
    if os.path.isdir(annotations_path):
        gt = mme_ground_truth(annotations_path)
        _need_prompts(answers, "mme")
        for a in answers:
            category, image = str(a["question_id"]).split("/")[0], str(a["question_id"]).split("/")[-1]
            name = os.path.splitext(image)[0] + ".txt"
            prompt = a["prompt"].replace(SHORT.strip(), "").strip()
            candidates = [prompt] if "Please answer yes or no." in prompt else [
                prompt + " Please answer yes or no.", prompt + "  Please answer yes or no."]
            truth = next((gt[(category, name, p)] for p in candidates if (category, name, p) in gt), None)
            (rows.append((category, image, truth, a["text"])) if truth else unmatched.append(a["question_id"]))
    else:
        pairs, unmatched = match(answers, load_records(annotations_path))
        for a, r in pairs:
            qid = str(a["question_id"])
            rows.append((r.get("category", qid.split("/")[0]), r.get("image", qid.split("/")[-1]),
                         answers_of(r)[0], a["text"]))
    return mme_scores(rows), rows, unmatched


SCORERS = {
    "vqa_soft": lambda ans, recs: score_vqa(ans, recs),
    "gqa": score_per_question(accuracy),
    "anls": score_per_question(anls_score),
    "chartqa": score_per_question(chartqa_match),
    "ai2d": score_per_question(ai2d_match),
    "pope": score_pope,
}
HEADLINE = {"textvqa": "accuracy", "vqav2": "accuracy", "gqa": "accuracy", "docvqa": "anls_score",
            "chartqa": "chartqa_match", "ai2d": "ai2d_match", "pope": "f1", "mme": "perception"}


JUDGED = {"llava_bench": "relative", "mmvet": "total"}


def score_answers(benchmark: str, answers: list[dict], annotations_path: str, judge=None,
                  reviews_path: str | None = None) -> dict:
    """{'benchmark', 'score' (the headline number), 'metrics', 'answers', 'scored', 'unmatched'}. The GPT-judged
    benchmarks need `judge` (`uhd_jax.eval.judge.Judge`) and a `reviews_path` to cache the reviews in."""
    from uhd_jax.eval.extra_scoring import EXTRA_SCORERS

    known = {**HEADLINE, **{b: h for b, (_, h) in EXTRA_SCORERS.items()}, **JUDGED}
    if benchmark not in known:
        raise UserError(f"no annotation scorer for {benchmark!r}; choose from {sorted(known)} "
                        f"(synthetic_reading scores with --checkpoint)")
    if benchmark in JUDGED:
        from uhd_jax.eval import judge as judging

        if judge is None:
            raise UserError(f"{benchmark} is scored by a GPT judge: give --judge-url (an OpenAI-compatible endpoint) "
                            f"and --judge-model")
        scorer = judging.score_llava_bench if benchmark == "llava_bench" else judging.score_mmvet
        metrics, pairs, unmatched = scorer(answers, annotations_path, judge, reviews_path)
    elif benchmark in EXTRA_SCORERS:
        metrics, pairs, unmatched = EXTRA_SCORERS[benchmark][0](answers, annotations_path)
    elif benchmark == "mme":
        metrics, pairs, unmatched = score_mme(answers, annotations_path)
    elif benchmark == "textvqa":
        metrics, pairs, unmatched = score_vqa(answers, load_records(annotations_path), textvqa=True)
    else:
        metrics, pairs, unmatched = SCORERS[BENCHMARKS[benchmark].scorer](answers, load_records(annotations_path))
    if answers and not pairs:   # a score of 0 here would be a wrong file, not a bad model
        raise UserError(f"none of the {len(answers)} answers matches an annotation in {annotations_path} (answer ids "
                        f"e.g. {[str(u) for u in unmatched[:3]]}): give the {benchmark} annotations of the split the "
                        f"questions came from")
    return {"benchmark": benchmark, "score": metrics[known[benchmark]], "metrics": metrics,
            "answers": len(answers), "scored": len(pairs), "unmatched": [str(u) for u in unmatched[:20]],
            "unmatched_count": len(unmatched)}
