"""The synthetic reading benchmark (`eval.synthetic_bench`) as local lmms-eval tasks, offline: a JSON-lines dataset
(`dataset_path: json`), a YAML per task and the utils.py its `!function` entries name.

  uhd_synthetic_reading     generate_until, scored as `uhd-evaluate --benchmark synthetic_reading` (exact, vqa, anls)
  uhd_synthetic_reading_mc  multiple_choice over the benchmark's own answers (the right one and the next `choices - 1`
                            answers of the file), scored by lmms-eval from our loglikelihood (acc)

  lmms-eval --model uhd_jax --model_args checkpoint=CKPT,benchmark=synthetic_reading \
      --include_path DIR --tasks uhd_synthetic_reading
"""
from __future__ import annotations

import json
import os

from uhd_jax.eval import synthetic_bench
from uhd_jax.eval.benchmarks import SHORT
from uhd_jax.eval.metrics.anls import anls
from uhd_jax.eval.metrics.exact import plain_match
from uhd_jax.eval.metrics.vqa_accuracy import soft_accuracy

GENERATE, CHOICE = "uhd_synthetic_reading", "uhd_synthetic_reading_mc"

_UTILS = "from uhd_jax.integrations.lmms_task import doc_to_text, doc_to_visual, process_results  # noqa: F401\n"


def _yaml(task: str, docs: str, cache: str, body: str) -> str:
    return (f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(docs)}\n"
            f"  cache_dir: {json.dumps(cache)}\n"
            f"test_split: test\ndoc_to_visual: !function utils.doc_to_visual\n"
            f"doc_to_text: !function utils.doc_to_text\n{body}metadata:\n  - version: 0.0\n")


def write_tasks(out: str, per_bucket: int = 40, sides=synthetic_bench.DEFAULT_SIDES, choices: int = 4,
                max_new_tokens: int = 128) -> dict:
    """Render the benchmark under `out/bench` and write both tasks beside it (the datasets cache too: nothing is
    looked up online). `max_new_tokens`: 128 is the synthetic_reading rule of every family but LLaVAR (which
    samples); the generation is greedy. Returns {'include_path', 'bench' (synthetic_bench.build's paths), 'docs'}."""
    bench = synthetic_bench.build(os.path.join(out, "bench"), per_bucket, tuple(sides))
    with open(bench["annotations"]) as f:
        answers = {a["question_id"]: a["answer"] for a in json.load(f)["annotations"]}
    with open(bench["questions"]) as f:
        questions = [json.loads(line) for line in f if line.strip()]
    pool = [answers[q["question_id"]] for q in questions]
    docs = []
    for i, q in enumerate(questions):
        options = [pool[i]]
        for a in pool[i + 1:] + pool[:i]:   # distinct answers of other questions, in file order
            if len(options) == choices:
                break
            if a not in options:
                options.append(a)
        docs.append({"question_id": q["question_id"], "image": os.path.abspath(os.path.join(bench["images"],
                                                                                           q["image"])),
                     "text": q["text"], "answer": pool[i], "bucket": q["bucket"], "options": options})
    tasks = os.path.join(out, "tasks")
    os.makedirs(tasks, exist_ok=True)
    docs_path, cache = os.path.join(tasks, "docs.jsonl"), os.path.join(out, "datasets_cache")
    with open(docs_path, "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    with open(os.path.join(tasks, "utils.py"), "w") as f:
        f.write(_UTILS)
    metrics = "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n"
                      for m in ("exact", "vqa", "anls"))
    generate = ("output_type: generate_until\ndoc_to_target: answer\n"
                f"generation_kwargs:\n  max_new_tokens: {int(max_new_tokens)}\n  temperature: 0\n  do_sample: false\n"
                "  num_beams: 1\n  until: []\nprocess_results: !function utils.process_results\n"
                f"metric_list:\n{metrics}")
    choice = "output_type: multiple_choice\ndoc_to_target: 0\ndoc_to_choice: options\nmetric_list:\n  - metric: acc\n"
    for task, body in ((GENERATE, generate), (CHOICE, choice)):
        with open(os.path.join(tasks, task + ".yaml"), "w") as f:
            f.write(_yaml(task, docs_path, cache, body))
    return {"include_path": tasks, "bench": bench, "docs": docs_path}


def doc_to_visual(doc: dict) -> list:
    from PIL import Image

    with Image.open(doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs=None) -> str:
    """The question file's text (question + the short-answer suffix) for both tasks: the multiple-choice one scores
    each option as the answer to the same prompt."""
    return doc["text"] if doc["text"].endswith(SHORT) else doc["text"] + SHORT


def process_results(doc: dict, results: list) -> dict:
    """`synthetic_bench.score`'s three numbers for one answer, in percent (lmms-eval averages them)."""
    answer, ref = results[0], doc["answer"]
    return {"exact": 100.0 * plain_match(answer, ref), "vqa": 100.0 * soft_accuracy(answer, [ref] * 10),
            "anls": 100.0 * anls(answer, [ref])}
