"""The project's high-resolution reading benchmark: held-out synthetic cards (`uhd_jax.data.synthetic_cards`, the
demo's dataset) at fixed long sides from 336 to 2048 px, one fine-detail question each ("What is the code?": a
digit printed at 1/7 of the card's short side).

The card's layout is proportional to its size, so every bucket holds the same picture at more pixels: a model that
pads it to one square of B px (LLaVA-1.5) sees the digit at ~B/28 px in every bucket, a slicing model (LLaVA-UHD,
4 slices along the card) at ~B/7 px. Each bucket draws its cards from its own seed stream, none of them a training
split's (the demo's splits are seeds 0 and 1). This reproduces, in miniature, the paper's claim that UHD reads small
text that fixed-336 LLaVA-1.5 cannot, at equal training budget.

Scores per bucket: exact match (case, spacing and a final period ignored), VQA accuracy with the reference as all
ten human answers (= the EvalAI-normalised match) and ANLS (partial credit for near-misses), and `wilson` gives the
binomial interval of an exact-match rate.
"""
from __future__ import annotations

import collections
import json
import math
import os

from PIL import Image, ImageDraw, ImageFont

from uhd_jax.data.synthetic_cards import FINE_QUESTIONS, render
from uhd_jax.eval.benchmarks import SHORT
from uhd_jax.eval.metrics.anls import anls
from uhd_jax.eval.metrics.exact import plain_match
from uhd_jax.eval.metrics.vqa_accuracy import soft_accuracy

READING_QUESTIONS = FINE_QUESTIONS
DEFAULT_SIDES = (336, 672, 1024, 1536, 2048)
SEED = 7919   # a stream no training split uses (the demo's splits are seeds 0 and 1)
QUESTIONS_FILE, ANNOTATIONS_FILE = "questions.jsonl", "annotations.json"


def build(out: str, per_bucket: int = 40, sides=DEFAULT_SIDES, seed: int = SEED) -> dict:
    """Render the benchmark into `out` (images/, questions.jsonl, annotations.json) unless it is there already with
    the same settings. Returns the paths."""
    paths = {"questions": os.path.join(out, QUESTIONS_FILE), "annotations": os.path.join(out, ANNOTATIONS_FILE),
             "images": os.path.join(out, "images")}
    settings = {"per_bucket": per_bucket, "sides": list(sides), "seed": seed, "data": "cards"}
    if os.path.exists(paths["annotations"]):
        with open(paths["annotations"]) as f:
            if json.load(f).get("settings") == settings:
                return paths
    questions, annotations = [], []
    for side in sides:
        os.makedirs(os.path.join(paths["images"], str(side)), exist_ok=True)
        for i in range(per_bucket):
            img, _, qa = render(seed + side, i, long_side=side)
            question, answer = next((q, a) for q, a in qa if q in READING_QUESTIONS)
            name = f"{side}/{i:04d}.png"
            img.save(os.path.join(paths["images"], name))
            qid = f"{side}-{i:04d}"
            questions.append({"question_id": qid, "image": name, "text": question + SHORT, "bucket": side,
                              "width": img.width, "height": img.height, "kind": "card"})
            annotations.append({"question_id": qid, "answer": answer, "bucket": side, "kind": "card"})
    with open(paths["questions"], "w") as f:
        f.writelines(json.dumps(q) + "\n" for q in questions)
    with open(paths["annotations"], "w") as f:
        json.dump({"settings": settings, "annotations": annotations}, f)
    return paths


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% at z = 1.96) of a rate of `hits` in `n`, as fractions."""
    if n <= 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


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
