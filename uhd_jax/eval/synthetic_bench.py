"""The project's high-resolution reading benchmark: held-out synthetic images whose answers must be read from text
rendered at a known size, at fixed long sides from 336 to 2048 px and aspect ratios from 1:4 to 4:1.

Each image comes from the synthetic generator (`uhd_jax.data.synthetic.render`, its own seed stream, so no image is
in a training split) with its long side set to a bucket; it gets one reading question (the sign's word, a receipt's
total or first item, a page's title or its small top-right word, the tallest bar's label). The text's size is
proportional to the image, so a larger bucket holds the same layout at more pixels: a model that sees the image at
336 px (LLaVA-1.5) reads it no better in larger buckets, a slicing model (LLaVA-UHD) should. This reproduces, in
miniature, the paper's claim that UHD beats fixed-336 LLaVA-1.5 on small text at equal training budget.

Scores per bucket: exact match (case, spacing and a final period ignored), VQA accuracy with the reference as all
ten human answers (= the EvalAI-normalised match) and ANLS (partial credit for near-misses).
"""
from __future__ import annotations

import collections
import json
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from uhd_jax.data.synthetic import render
from uhd_jax.eval.benchmarks import SHORT
from uhd_jax.eval.metrics.anls import anls
from uhd_jax.eval.metrics.exact import plain_match
from uhd_jax.eval.metrics.vqa_accuracy import soft_accuracy

READING_QUESTIONS = ("What does the sign say?", "What is the total?", "What is the first item?", "What is the title?",
                     "What is written in the top-right corner?", "Which bar is the tallest?")
DEFAULT_SIDES = (336, 672, 1024, 1536, 2048)
SEED = 7919   # a stream no training split uses (the demo's splits are seeds 0 and 1)
QUESTIONS_FILE, ANNOTATIONS_FILE = "questions.jsonl", "annotations.json"


def build(out: str, per_bucket: int = 40, sides=DEFAULT_SIDES, seed: int = SEED) -> dict:
    """Render the benchmark into `out` (images/, questions.jsonl, annotations.json) unless it is there already with
    the same settings. Returns the paths."""
    paths = {"questions": os.path.join(out, QUESTIONS_FILE), "annotations": os.path.join(out, ANNOTATIONS_FILE),
             "images": os.path.join(out, "images")}
    settings = {"per_bucket": per_bucket, "sides": list(sides), "seed": seed}
    if os.path.exists(paths["annotations"]):
        with open(paths["annotations"]) as f:
            if json.load(f).get("settings") == settings:
                return paths
    questions, annotations = [], []
    for side in sides:
        os.makedirs(os.path.join(paths["images"], str(side)), exist_ok=True)
        for i in range(per_bucket):
            img, kind, _, qa = render(seed + side, i, min_side=side, max_side=side)
            reading = [(q, a) for q, a in qa if q in READING_QUESTIONS]
            question, answer = reading[int(np.random.default_rng([seed, side, i]).integers(len(reading)))]
            name = f"{side}/{i:04d}.png"
            img.save(os.path.join(paths["images"], name))
            qid = f"{side}-{i:04d}"
            questions.append({"question_id": qid, "image": name, "text": question + SHORT, "bucket": side,
                              "width": img.width, "height": img.height, "kind": kind})
            annotations.append({"question_id": qid, "answer": answer, "bucket": side, "kind": kind})
    with open(paths["questions"], "w") as f:
        f.writelines(json.dumps(q) + "\n" for q in questions)
    with open(paths["annotations"], "w") as f:
        json.dump({"settings": settings, "annotations": annotations}, f)
    return paths


def score(answers: list[dict], annotations_path: str) -> dict:
    """{'buckets': {side: {exact, vqa, anls, n}}, 'overall': {...}, 'missing': n} (percentages)."""
    with open(annotations_path) as f:
        refs = {a["question_id"]: a for a in json.load(f)["annotations"]}
    by_bucket = collections.defaultdict(list)
    got = {a["question_id"]: a["text"] for a in answers}
    for qid, ref in refs.items():
        if qid in got:
            by_bucket[ref["bucket"]].append((got[qid], ref["answer"]))

    def summary(rows):
        n = len(rows)
        return {"exact": 100.0 * sum(plain_match(p, a) for p, a in rows) / n,
                "vqa": 100.0 * sum(soft_accuracy(p, [a] * 10) for p, a in rows) / n,
                "anls": 100.0 * sum(anls(p, [a]) for p, a in rows) / n, "n": n}

    buckets = {side: summary(rows) for side, rows in sorted(by_bucket.items())}
    everything = [row for rows in by_bucket.values() for row in rows]
    return {"buckets": buckets, "overall": summary(everything) if everything else None,
            "missing": len(refs) - len(everything)}


def bar_chart(results: dict[str, dict], out_png: str, metric: str = "exact", title: str = "") -> str:
    """Grouped bars: accuracy (`metric`) per resolution bucket, one colour per model. results: {model: score()}."""
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    sides = sorted({int(s) for r in results.values() for s in r["buckets"]})
    w, h, left, bottom, top = 120 + 110 * max(len(sides), 1), 420, 60, 60, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=13)
    plot_h = h - bottom - top
    d.line((left, top, left, h - bottom), fill="black")
    d.line((left, h - bottom, w - 20, h - bottom), fill="black")
    for pct in range(0, 101, 20):
        y = h - bottom - plot_h * pct / 100
        d.line((left - 4, y, left, y), fill="black")
        d.text((left - 34, y - 7), f"{pct}%", fill="black", font=font)
    group = (w - left - 30) / max(len(sides), 1)
    bar = group * 0.8 / max(len(results), 1)
    for gi, side in enumerate(sides):
        x0 = left + 10 + gi * group
        d.text((x0 + group * 0.25, h - bottom + 8), f"{side}px", fill="black", font=font)
        for mi, (name, r) in enumerate(results.items()):
            cell = r["buckets"].get(side) or r["buckets"].get(str(side))
            if cell is None:
                continue
            y = h - bottom - plot_h * cell[metric] / 100
            x = x0 + mi * bar
            d.rectangle((x, y, x + bar - 3, h - bottom), fill=palette[mi % len(palette)])
            d.text((x, y - 15), f"{cell[metric]:.0f}", fill="black", font=font)
    for mi, name in enumerate(results):
        d.rectangle((left + 10 + 150 * mi, 12, left + 22 + 150 * mi, 24), fill=palette[mi % len(palette)])
        d.text((left + 28 + 150 * mi, 11), name, fill="black", font=font)
    d.text((left, h - 22), title or f"{metric} accuracy per image long side", fill="black", font=font)
    img.save(out_png)
    return out_png
