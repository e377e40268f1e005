"""`make demo`: generate the synthetic text-rich dataset, train a tiny LLaVA-1.5 through both stages on the CPU, and
report held-out exact-match accuracy before and after training.

  python launch/demo.py [--workdir runs/demo] [--train 2000] [--eval 200]

Steps: (1) render train/eval images and questions and build a tokenizer (once; cached in <workdir>/data);
(2) score the untrained model; (3) stage `pretrain` (captions, projector only) and stage `sft` (questions, projector
+ LLM) with `configs/llava15.py:demo`; (4) score the trained model per question type, beside the best a model could
do without looking (the most frequent training answer of each question). A rerun resumes or skips finished stages.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags, logging  # noqa: E402

flags.FLAGS.mark_as_parsed()  # Grain worker processes read absl flags
logging.set_verbosity(logging.WARNING)

import jax  # noqa: E402
import flax.linen as nn  # noqa: E402

from uhd_jax.config_loading import load_config  # noqa: E402
from uhd_jax.data import synthetic  # noqa: E402
from uhd_jax.data.dataset import SamplePreparer, read_samples  # noqa: E402
from uhd_jax.eval.vqa import answer_prompts, exact_match, normalize_answer  # noqa: E402
from uhd_jax.models.vlm import init_fn  # noqa: E402
from uhd_jax.train.checkpoints import load_params  # noqa: E402
from uhd_jax.train.trainer import model_for_stage, run  # noqa: E402


def make_data(root: str, n_train: int, n_eval: int):
    out = os.path.join(root, "synthetic")
    if os.path.exists(os.path.join(out, "tokenizer", "tokenizer.json")):
        return out
    t0 = time.perf_counter()
    train = synthetic.write_dataset(out, "train", n_train, seed=0, min_side=96, max_side=768)
    synthetic.write_dataset(out, "eval", n_eval, seed=1, min_side=96, max_side=768)
    synthetic.build_tokenizer(synthetic.corpus_texts([train["pretrain"], train["sft"]]),
                              os.path.join(out, "tokenizer"), vocab_size=1024)
    print(f"[1/4] synthetic dataset: {n_train} train + {n_eval} held-out images in {time.perf_counter() - t0:.0f}s "
          f"-> {out}")
    return out


def question_text(value: str) -> str:
    """The question of a human turn, without the image placeholder and the answer-format suffix."""
    return value.replace("<image>\n", "").split("\n")[0]


def question_of(sample) -> str:
    return question_text(sample["conversations"][0]["value"])


def score(cfg, params, prep, samples, tokenizer):
    prompts = [prep.prompt(s) for s in samples]
    preds = answer_prompts(cfg, params, prompts, tokenizer, batch_size=50, max_new_tokens=8)
    by_q = collections.defaultdict(list)
    for s, p, pr in zip(samples, prompts, preds):
        by_q[question_of(s)].append(exact_match(pr, p["answer"]))
    overall = sum(sum(v) for v in by_q.values()) / len(samples)
    return overall, {q: sum(v) / len(v) for q, v in by_q.items()}, preds


def prior_baseline(train_samples, eval_samples):
    """The best a model can do without the image: the most frequent training answer of each question."""
    answers = collections.defaultdict(collections.Counter)
    for s in train_samples:
        conv = s["conversations"]
        for i in range(0, len(conv) - 1, 2):
            answers[question_text(conv[i]["value"])][normalize_answer(conv[i + 1]["value"])] += 1
    hits = [normalize_answer(s["conversations"][1]["value"]) == answers[question_of(s)].most_common(1)[0][0]
            for s in eval_samples]
    return sum(hits) / len(hits)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--eval", type=int, default=200)
    a = p.parse_args(argv)
    t_start = time.perf_counter()
    data_root = os.path.join(a.workdir, "data")
    data = make_data(data_root, a.train, a.eval)
    config = load_config("configs/llava15.py:demo")
    config.data_root = data_root
    cfg = model_for_stage(config, config.stages.sft)
    from transformers.models.auto.tokenization_auto import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(data, "tokenizer"))
    prep = SamplePreparer(tokenizer_path=os.path.join(data, "tokenizer"), image_folder=os.path.join(data, "images"),
                          template=config.stages.sft.template, max_length=config.stages.sft.max_length,
                          tokens_per_image=cfg.tokens_per_image, image_size=cfg.vision.image_size)
    eval_samples = read_samples(os.path.join(data, "eval_sft.json"))
    train_samples = read_samples(os.path.join(data, "train_sft.json"))

    untrained = nn.meta.unbox(jax.jit(init_fn(cfg))(jax.random.PRNGKey(config.seed))["params"])
    before, before_q, _ = score(cfg, untrained, prep, eval_samples, tokenizer)
    print(f"[2/4] untrained model: exact match {100 * before:.1f}% on {len(eval_samples)} held-out questions")

    t0 = time.perf_counter()
    results = run(config, os.path.join(a.workdir, "run"))
    print(f"[3/4] trained stages {', '.join(r.name for r in results)} in {time.perf_counter() - t0:.0f}s")

    trained = load_params(results[-1].final_dir)
    after, after_q, preds = score(cfg, trained, prep, eval_samples, tokenizer)
    prior = prior_baseline(train_samples, eval_samples)
    print(f"[4/4] held-out exact match: untrained {100 * before:.1f}% -> trained {100 * after:.1f}% "
          f"(answering without the image, from training-answer frequencies: {100 * prior:.1f}%)")
    width = max(len(q) for q in after_q)
    for q in sorted(after_q):
        print(f"      {q:<{width}}  {100 * before_q[q]:5.1f}% -> {100 * after_q[q]:5.1f}%")
    report = {"untrained": before, "trained": after, "no_image_prior": prior, "per_question": after_q,
              "examples": [{"id": s["id"], "question": question_of(s), "answer": s["conversations"][1]["value"],
                            "prediction": pr} for s, pr in list(zip(eval_samples, preds))[:20]],
              "seconds": time.perf_counter() - t_start}
    with open(os.path.join(a.workdir, "results.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"demo finished in {time.perf_counter() - t_start:.0f}s; curves: {a.workdir}/run/*/curves.png, "
          f"results: {a.workdir}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
