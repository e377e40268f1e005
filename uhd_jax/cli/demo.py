"""`make demo`: generate the synthetic text-rich dataset, train a tiny LLaVA-1.5 and a tiny LLaVA-UHD v2 through all
their stages on the CPU, and report each one's held-out exact-match accuracy before and after training.

  uhd-demo [--workdir runs/demo] [--models llava15,uhd_v2] [--train 2000] [--eval 200]
  uhd-demo --models slime      # SliME's four stages (~25 min on 2 cores; not in the default)

Steps: (1) render train/eval images and questions and build a tokenizer (once; cached in <workdir>/data); then per
model: (2) score the untrained model; (3) train its stages with `configs/<model>.py:demo` (LLaVA-1.5: `pretrain`,
`sft`; UHD v2: `jbu`, `pretrain`, `sft`; SliME: `mlp_adapter`, `attn_adapter`, `local_compressor`, `sft`); (4) score
the trained model per question type. The summary puts the models side by side on the same held-out questions, beside
the best a model could do without looking (the most frequent training answer of each question). A rerun resumes or
skips finished stages. SIGTERM or Ctrl-C saves the current step first and exits with status 128 + the signal's
number, as uhd-train does.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

from absl import flags, logging  # noqa: E402

flags.FLAGS.mark_as_parsed()  # Grain worker processes read absl flags
logging.set_verbosity(logging.WARNING)

import jax  # noqa: E402
import flax.linen as nn  # noqa: E402

from uhd_jax.cli_errors import UserError, load_config, reports_user_errors  # noqa: E402
from uhd_jax.config_loading import PACKAGE  # noqa: E402
from uhd_jax.data import synthetic  # noqa: E402
from uhd_jax.data.dataset import read_samples  # noqa: E402
from uhd_jax.data.pipeline import Source  # noqa: E402
from uhd_jax.eval.decoding import GenerationConfig  # noqa: E402
from uhd_jax.eval.generate import Generator  # noqa: E402
from uhd_jax.eval.metrics.exact import plain_match, plain_normalize  # noqa: E402
from uhd_jax.models.vlm import init_fn  # noqa: E402
from uhd_jax.train.checkpoints import load_params  # noqa: E402
from uhd_jax.train.trainer import Preempted, model_for_stage, packed_layout, preparer_factory, run  # noqa: E402

MODELS = {"llava15": ("LLaVA-1.5", "configs/llava15.py:demo"), "uhd_v2": ("LLaVA-UHD v2", "configs/uhd_v2.py:demo"),
          "slime": ("SliME", "configs/slime.py:demo")}
DATA_FILES = ("tokenizer/tokenizer.json", "train_pretrain.json", "train_sft.json", "eval_sft.json", "images")


def make_data(root: str, n_train: int, n_eval: int):
    out = os.path.join(root, "synthetic")
    if os.path.exists(os.path.join(out, "tokenizer", "tokenizer.json")):
        missing = [f for f in DATA_FILES if not os.path.exists(os.path.join(out, f))]
        if missing:   # the tokenizer is written last: these were deleted since
            raise UserError(f"the cached demo data {out} lacks {missing}; delete {out} and rerun to render it again")
        return out
    t0 = time.perf_counter()
    train = synthetic.write_dataset(out, "train", n_train, seed=0, min_side=96, max_side=768)
    synthetic.write_dataset(out, "eval", n_eval, seed=1, min_side=96, max_side=768)
    synthetic.build_tokenizer(synthetic.corpus_texts([train["pretrain"], train["sft"]]),
                              os.path.join(out, "tokenizer"), vocab_size=1024)
    print(f"[1] synthetic dataset: {n_train} train + {n_eval} held-out images in {time.perf_counter() - t0:.0f}s "
          f"-> {out}")
    return out


def question_text(value: str) -> str:
    """The question of a human turn, without the image placeholder and the answer-format suffix."""
    return value.replace("<image>\n", "").split("\n")[0]


def question_of(sample) -> str:
    return question_text(sample["conversations"][0]["value"])


class Scorer:
    """Held-out exact match of one demo model, prompts prepared exactly as its SFT stage prepares samples."""

    def __init__(self, config, data: str, eval_samples, tokenizer):
        sft = config.stages.sft
        self.cfg = model_for_stage(config, sft)
        prep = preparer_factory(config, sft, self.cfg)(
            Source(os.path.join(data, "eval_sft.json"), os.path.join(data, "images")))
        self.layout = packed_layout(config, self.cfg, sft)
        self.samples, self.tokenizer = eval_samples, tokenizer
        self.prompts = [prep.prompt(s) for s in eval_samples]

    def __call__(self, params):
        preds = Generator(self.cfg, params, self.tokenizer, GenerationConfig(max_new_tokens=8), batch_size=50,
                          packed_layout=self.layout)(self.prompts)
        by_q = collections.defaultdict(list)
        for s, p, pr in zip(self.samples, self.prompts, preds):
            by_q[question_of(s)].append(plain_match(pr, p["answer"]))
        overall = sum(sum(v) for v in by_q.values()) / len(self.samples)
        return overall, {q: sum(v) / len(v) for q, v in by_q.items()}, preds


def train_and_score(key: str, data_root: str, data: str, workdir: str, eval_samples, tokenizer) -> dict:
    title, spec = MODELS[key]
    config = load_config(os.path.join(PACKAGE, spec))   # the shipped demo configs, from any directory
    config.data_root = data_root
    score = Scorer(config, data, eval_samples, tokenizer)
    untrained = nn.meta.unbox(jax.jit(init_fn(score.cfg))(jax.random.PRNGKey(config.seed))["params"])
    before, before_q, _ = score(untrained)
    print(f"[2] {title} untrained: exact match {100 * before:.1f}% on {len(eval_samples)} held-out questions")
    t0 = time.perf_counter()
    results = run(config, os.path.join(workdir, "run", key))
    seconds = time.perf_counter() - t0
    earlier = all(r.steps < 0 for r in results)   # every stage had finished in an earlier run of the demo
    trained = "trained earlier" if earlier else f"trained in {seconds:.0f}s"
    print(f"[3] {title}: stages {', '.join(r.name for r in results)} {trained}")
    after, after_q, preds = score(load_params(results[-1].final_dir))
    print(f"[4] {title} held-out exact match: untrained {100 * before:.1f}% -> trained {100 * after:.1f}%")
    return {"model": title, "config": spec, "untrained": before, "trained": after, "per_question_untrained": before_q,
            "per_question": after_q, "train_seconds": None if earlier else seconds, "training": trained,
            "examples": [{"id": s["id"], "question": question_of(s), "answer": s["conversations"][1]["value"],
                          "prediction": pr} for s, pr in list(zip(eval_samples, preds))[:20]]}


def prior_baseline(train_samples, eval_samples):
    """The best a model can do without the image: the most frequent training answer of each question."""
    answers = collections.defaultdict(collections.Counter)
    for s in train_samples:
        conv = s["conversations"]
        for i in range(0, len(conv) - 1, 2):
            answers[question_text(conv[i]["value"])][plain_normalize(conv[i + 1]["value"])] += 1
    # A question no training sample asks (small --train) has no prior answer: a miss, not an IndexError.
    hits = [plain_normalize(s["conversations"][1]["value"]) == next(iter(answers[question_of(s)].most_common(1)),
                                                                    (None,))[0]
            for s in eval_samples]
    return sum(hits) / len(hits)


@reports_user_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--models", default="llava15,uhd_v2", help=f"comma-separated, from {sorted(MODELS)}")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--eval", type=int, default=200)
    a = p.parse_args(argv)
    keys = [k for k in a.models.split(",") if k]
    unknown = [k for k in keys if k not in MODELS]
    if unknown or not keys:
        p.error(f"--models: unknown {unknown or keys}; choose from {sorted(MODELS)}")
    if a.train < 1 or a.eval < 1:
        p.error(f"--train {a.train} --eval {a.eval}: give at least one image each")
    if os.path.exists(a.workdir) and not os.path.isdir(a.workdir):
        p.error(f"--workdir {a.workdir} is a file; give a directory (created if missing)")
    t_start = time.perf_counter()
    data_root = os.path.join(a.workdir, "data")
    data = make_data(data_root, a.train, a.eval)
    from transformers.models.auto.tokenization_auto import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(data, "tokenizer"))
    eval_samples = read_samples(os.path.join(data, "eval_sft.json"))
    prior = prior_baseline(read_samples(os.path.join(data, "train_sft.json")), eval_samples)
    try:
        reports = [train_and_score(k, data_root, data, a.workdir, eval_samples, tokenizer) for k in keys]
    except Preempted as e:   # SIGTERM / Ctrl-C: the stage saved its step; a rerun resumes it
        print(f"demo.py: {e}", file=sys.stderr, flush=True)
        return 128 + e.signum
    except KeyboardInterrupt as e:   # a second signal while the first one's checkpoint was being saved
        print(f"demo.py: interrupted ({e or 'KeyboardInterrupt'}); the last finished checkpoint stays",
              file=sys.stderr, flush=True)
        return 130

    print(f"\nheld-out exact match on the same {len(eval_samples)} questions (answering without the image, from "
          f"training-answer frequencies: {100 * prior:.1f}%):")
    width = max(len(q) for r in reports for q in r["per_question"])
    names = [r["model"] for r in reports]
    print("  " + " " * width + "".join(f"  {n:>24}" for n in names))
    rows = [("overall", {r["model"]: (r["untrained"], r["trained"]) for r in reports})]
    for q in sorted(reports[0]["per_question"]):
        rows.append((q, {r["model"]: (r["per_question_untrained"][q], r["per_question"][q]) for r in reports}))
    for label, cells in rows:
        print(f"  {label:<{width}}" + "".join(
            f"  {100 * cells[n][0]:9.1f}% ->{100 * cells[n][1]:9.1f}%" for n in names))
    print("  " + " " * width + "".join(f"  {r['training']:>24}" for r in reports))
    report = {"no_image_prior": prior, "models": {k: r for k, r in zip(keys, reports)},
              "seconds": time.perf_counter() - t_start}
    with open(os.path.join(a.workdir, "results.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"demo finished in {time.perf_counter() - t_start:.0f}s; curves: {a.workdir}/run/*/*/curves.png, "
          f"results: {a.workdir}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
