"""`make demo`: render the synthetic card dataset, train a tiny LLaVA-1.5 and a tiny LLaVA-UHD v2 through all their
stages on the CPU with two seeds, and compare them on held-out fine-detail and coarse questions at their training
FLOPs; then run the reading benchmark on both models and chart it.

  uhd-demo [--workdir runs/demo] [--models llava15,uhd_v2] [--seeds 0,1] [--train 2000] [--eval 200]
           [--per-bucket 100]        # reading benchmark questions per image size (0: skip the benchmark)
  uhd-demo --models slime            # SliME's four stages on the same data (not in the default)

Steps: (1) render train/eval cards (`uhd_jax.data.synthetic_cards`), install the shipped glyph-reading ViT both
models start from (`uhd_jax.train.glyph_vit`) and build a tokenizer (once; cached in <workdir>/data); (2) per
seed and model: train its stages with `configs/<model>.py:demo` (seed overridden), count
the run's model FLOPs (`uhd_jax.perf.run_flops`), score the held-out questions per group (fine: the small printed
code; coarse: the card's colour, the shapes' kind, colour and count); (3) the summary beside the best image-blind
answers (the most frequent training answer of each question); (4) the reading benchmark (`uhd-evaluate --benchmark
synthetic_reading`) on each model's first seed, with 95% binomial intervals. A rerun skips finished stages. SIGTERM
or Ctrl-C saves the current step first and exits with status 128 + the signal's number, as uhd-train does.
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

from uhd_jax.cli_errors import UserError, load_config, reports_user_errors  # noqa: E402
from uhd_jax.config_loading import PACKAGE  # noqa: E402
from uhd_jax.data import synthetic, synthetic_cards  # noqa: E402
from uhd_jax.data.dataset import read_samples  # noqa: E402
from uhd_jax.data.pipeline import Source  # noqa: E402
from uhd_jax.eval.decoding import GenerationConfig  # noqa: E402
from uhd_jax.eval.generate import Generator  # noqa: E402
from uhd_jax.eval.metrics.exact import plain_match, plain_normalize  # noqa: E402
from uhd_jax.perf import run_flops  # noqa: E402
from uhd_jax.train import glyph_vit  # noqa: E402
from uhd_jax.train.checkpoints import load_params  # noqa: E402
from uhd_jax.train.trainer import Preempted, model_for_stage, packed_layout, preparer_factory, run  # noqa: E402

MODELS = {"llava15": ("LLaVA-1.5", "configs/llava15.py:demo"), "uhd_v2": ("LLaVA-UHD v2", "configs/uhd_v2.py:demo"),
          "slime": ("SliME", "configs/slime.py:demo")}
DATA_FILES = ("tokenizer/tokenizer.json", "train_pretrain.json", "train_sft.json", "eval_sft.json", "images",
              "glyph_vit/config.json")
GROUPS = ("fine", "coarse")
FLOPS: dict = {}   # model key -> run_flops.training_flops of its demo config
READING_SIDES = (336, 1024, 2048)   # the reading benchmark's long sides: its smallest, and two at >= 1024 px


def make_data(root: str, n_train: int, n_eval: int):
    out = os.path.join(root, "synthetic")
    if os.path.exists(os.path.join(out, "tokenizer", "tokenizer.json")):
        missing = [f for f in DATA_FILES if not os.path.exists(os.path.join(out, f))]
        if missing:   # the tokenizer is written last: these were deleted since
            raise UserError(f"the cached demo data {out} lacks {missing}; delete {out} and rerun to render it again")
        return out
    t0 = time.perf_counter()
    train = synthetic_cards.write_dataset(out, "train", n_train, seed=0, turns=3)
    synthetic_cards.write_dataset(out, "eval", n_eval, seed=1)
    # Both models' ViT: pretrained to read digits (uhd_jax.train.glyph_vit), as CLIP is pretrained to see.
    glyph_vit.install(glyph_vit.DEMO_WEIGHTS, os.path.join(out, "glyph_vit"),
                      load_config(os.path.join(PACKAGE, MODELS["llava15"][1])).model.to_dict())
    synthetic.build_tokenizer(synthetic.corpus_texts([train["pretrain"], train["sft"]]),
                              os.path.join(out, "tokenizer"), vocab_size=1024)
    print(f"[1] synthetic cards: {n_train} train + {n_eval} held-out images in {time.perf_counter() - t0:.0f}s "
          f"-> {out}", flush=True)
    return out


def question_text(value: str) -> str:
    """The question of a human turn, without the image placeholder and the answer-format suffix."""
    return value.replace("<image>\n", "").split("\n")[0]


def question_of(sample) -> str:
    return question_text(sample["conversations"][0]["value"])


def group_rates(hits_by_sample, samples) -> dict:
    by = collections.defaultdict(list)
    for s, hit in zip(samples, hits_by_sample):
        by[synthetic_cards.group_of(question_of(s))].append(hit)
    return {g: sum(by[g]) / len(by[g]) for g in GROUPS if by[g]}


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
        preds = Generator(self.cfg, params, self.tokenizer, GenerationConfig(max_new_tokens=6), batch_size=50,
                          packed_layout=self.layout)(self.prompts)
        hits = [plain_match(pr, p["answer"]) for p, pr in zip(self.prompts, preds)]
        return group_rates(hits, self.samples), preds


def train_and_score(key: str, seed: int, data_root: str, data: str, workdir: str, eval_samples, tokenizer) -> dict:
    title, spec = MODELS[key]
    config = load_config(os.path.join(PACKAGE, spec))   # the shipped demo configs, from any directory
    config.data_root = data_root
    config.seed = seed
    t0, c0 = time.perf_counter(), os.times()
    results = run(config, os.path.join(workdir, "run", key, f"seed{seed}"))
    c1 = os.times()
    seconds, cpu = time.perf_counter() - t0, c1.user - c0.user + c1.system - c0.system
    earlier = all(r.steps < 0 for r in results)   # every stage had finished in an earlier run of the demo
    if key not in FLOPS:   # a seed changes the weights, not the run's shapes or steps
        FLOPS[key] = run_flops.training_flops(config)
    stage_flops = FLOPS[key]
    total = sum(f for _, f in stage_flops.values())
    rates, preds = Scorer(config, data, eval_samples, tokenizer)(load_params(results[-1].final_dir))
    trained = "trained earlier" if earlier else f"trained in {seconds:.0f}s ({cpu:.0f} CPU s)"
    print(f"[2] {title} seed {seed}: stages {', '.join(results[i].name for i in range(len(results)))} {trained}, "
          f"{total:.3g} FLOPs; held-out exact match fine {100 * rates['fine']:.1f}%, coarse "
          f"{100 * rates['coarse']:.1f}%", flush=True)
    return {"model": title, "key": key, "seed": seed, "config": spec, "groups": rates, "flops": total,
            "stage_flops": stage_flops, "train_seconds": None if earlier else seconds,
            "train_cpu_seconds": None if earlier else cpu, "final": results[-1].final_dir,
            "examples": [{"id": s["id"], "question": question_of(s), "answer": s["conversations"][1]["value"],
                          "prediction": pr} for s, pr in list(zip(eval_samples, preds))[:20]]}


def prior_baseline(train_samples, eval_samples) -> dict:
    """The best a model can do without the image: the most frequent training answer of each question, per group."""
    answers = collections.defaultdict(collections.Counter)
    for s in train_samples:
        conv = s["conversations"]
        for i in range(0, len(conv) - 1, 2):
            answers[question_text(conv[i]["value"])][plain_normalize(conv[i + 1]["value"])] += 1
    # A question no training sample asks (small --train) has no prior answer: a miss, not an IndexError.
    hits = [plain_normalize(s["conversations"][1]["value"]) == next(iter(answers[question_of(s)].most_common(1)),
                                                                    (None,))[0]
            for s in eval_samples]
    return group_rates(hits, eval_samples)


def summary(reports: list[dict], prior: dict, n_eval: int) -> list[str]:
    """The table: per model, each group's exact match averaged over seeds with each seed's value, and FLOPs."""
    by_model = collections.defaultdict(list)
    for r in reports:
        by_model[r["model"]].append(r)
    base = next(iter(by_model.values()))
    base_flops = sum(r["flops"] for r in base) / len(base)
    seeds = ", ".join(str(r["seed"]) for r in base)
    lines = [f"held-out exact match on {n_eval} questions per group (fine: the printed code; coarse: colours, "
             f"shape, count), mean over seeds {seeds} [each seed]:",
             f"  {'':<14}{'fine detail':>24}{'coarse':>24}{'training FLOPs':>22}",
             f"  {'image-blind':<14}{100 * prior['fine']:23.1f}%{100 * prior['coarse']:23.1f}%"]
    for name, rs in by_model.items():
        cells = []
        for g in GROUPS:
            vals = [100 * r["groups"][g] for r in rs]
            cells.append(f"{sum(vals) / len(vals):.1f}% [{' '.join(f'{v:.1f}' for v in vals)}]")
        f = sum(r["flops"] for r in rs) / len(rs)
        lines.append(f"  {name:<14}{cells[0]:>24}{cells[1]:>24}{f:14.3g} ({f / base_flops:.2f}x)")
    models = list(by_model)
    if len(models) >= 2:
        a, b = by_model[models[0]], by_model[models[-1]]
        for g in GROUPS:
            diffs = [100 * (y["groups"][g] - x["groups"][g]) for x, y in zip(a, b)]
            lines.append(f"  {models[-1]} - {models[0]}, {g}: " + ", ".join(
                f"seed {x['seed']} {d:+.1f}" for x, d in zip(a, diffs)) + " points")
    return lines


def reading_benchmark(reports: list[dict], data_root: str, workdir: str, per_bucket: int) -> list[str]:
    """`uhd-evaluate --benchmark synthetic_reading` on each model's first seed; the 95% intervals it implies."""
    from uhd_jax.cli import evaluate
    from uhd_jax.eval.synthetic_bench import wilson

    first = {}
    for r in reports:
        first.setdefault(r["key"], r)
    out = os.path.join(workdir, "reading")
    argv = ["--benchmark", "synthetic_reading", "--data-root", data_root, "--workdir", out,
            "--per-bucket", str(per_bucket), "--sides", *map(str, READING_SIDES), "--max-new-tokens", "6",
            "--batch-size", "50"]
    for key, r in first.items():
        argv += ["--checkpoint", r["final"], "--name", key]
    print(f"[3] uhd-evaluate {' '.join(argv)}", flush=True)
    if evaluate.main(argv) != 0:
        raise UserError("the reading benchmark failed (above)")
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    lines = [f"reading benchmark (fine detail, {per_bucket} cards per long side): exact match % [95% Wilson interval]"]
    for key, res in results.items():
        cells = []
        for side in READING_SIDES:
            cell = res["buckets"][str(side)]
            lo, hi = wilson(round(cell["exact"] * cell["n"] / 100), cell["n"])
            cells.append(f"{side}px {cell['exact']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]")
        lines.append(f"  {key:<8} " + "   ".join(cells))
    keys = list(results)
    if len(keys) >= 2:
        lo_key, hi_key = keys[0], keys[-1]
        for side in READING_SIDES:
            a, b = results[lo_key]["buckets"][str(side)], results[hi_key]["buckets"][str(side)]
            d = (b["exact"] - a["exact"]) / 100
            pa, pb = a["exact"] / 100, b["exact"] / 100
            half = 1.96 * ((pa * (1 - pa) / a["n"] + pb * (1 - pb) / b["n"]) ** 0.5)
            lines.append(f"  {hi_key} - {lo_key} at {side}px: {100 * d:+.1f} points, 95% interval "
                         f"[{100 * (d - half):+.1f}, {100 * (d + half):+.1f}]")
    lines.append(f"  chart: {out}/results.png")
    return lines


def save(workdir: str, prior: dict, reports: list, lines: list, t_start: float, c_start) -> tuple[float, float]:
    """Write results.json; returns (wall seconds, CPU seconds) since the start (worker processes included)."""
    c = os.times()
    cpu = c.user - c_start.user + c.system - c_start.system + c.children_user - c_start.children_user + \
        c.children_system - c_start.children_system
    seconds = time.perf_counter() - t_start
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump({"no_image_prior": prior, "runs": reports, "summary": lines, "seconds": seconds,
                   "cpu_seconds": cpu}, f, indent=2)
    return seconds, cpu


@reports_user_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--models", default="llava15,uhd_v2", help=f"comma-separated, from {sorted(MODELS)}")
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--eval", type=int, default=200)
    p.add_argument("--per-bucket", type=int, default=100, help="reading benchmark cards per size (0: skip it)")
    a = p.parse_args(argv)
    keys = [k for k in a.models.split(",") if k]
    unknown = [k for k in keys if k not in MODELS]
    if unknown or not keys:
        p.error(f"--models: unknown {unknown or keys}; choose from {sorted(MODELS)}")
    try:
        seeds = [int(x) for x in a.seeds.split(",") if x]
    except ValueError:
        p.error(f"--seeds {a.seeds}: give comma-separated integers")
    if not seeds:
        p.error("--seeds: give at least one seed")
    if a.train < 1 or a.eval < 1 or a.per_bucket < 0:
        p.error(f"--train {a.train} --eval {a.eval} --per-bucket {a.per_bucket}: give at least one image each")
    if os.path.exists(a.workdir) and not os.path.isdir(a.workdir):
        p.error(f"--workdir {a.workdir} is a file; give a directory (created if missing)")
    t_start, c_start = time.perf_counter(), os.times()
    # The second seed compiles the same programs as the first: a persistent cache saves their compile time.
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(a.workdir, "jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    data_root = os.path.join(a.workdir, "data")
    data = make_data(data_root, a.train, a.eval)
    from transformers.models.auto.tokenization_auto import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(data, "tokenizer"))
    eval_samples = read_samples(os.path.join(data, "eval_sft.json"))
    prior = prior_baseline(read_samples(os.path.join(data, "train_sft.json")), eval_samples)
    try:
        reports = [train_and_score(k, seed, data_root, data, a.workdir, eval_samples, tokenizer)
                   for seed in seeds for k in keys]
        lines = summary(reports, prior, a.eval)
        print("\n" + "\n".join(lines), flush=True)
        save(a.workdir, prior, reports, lines, t_start, c_start)
        if a.per_bucket:
            reading = reading_benchmark(reports, data_root, a.workdir, a.per_bucket)
            print("\n" + "\n".join(reading), flush=True)
            lines += reading
    except Preempted as e:   # SIGTERM / Ctrl-C: the stage saved its step; a rerun resumes it
        print(f"demo.py: {e}", file=sys.stderr, flush=True)
        return 128 + e.signum
    except KeyboardInterrupt as e:   # a second signal while the first one's checkpoint was being saved
        print(f"demo.py: interrupted ({e or 'KeyboardInterrupt'}); the last finished checkpoint stays",
              file=sys.stderr, flush=True)
        return 130
    seconds, cpu = save(a.workdir, prior, reports, lines, t_start, c_start)
    print(f"demo finished in {seconds:.0f}s ({cpu:.0f} CPU s, load average {os.getloadavg()[0]:.1f}); curves: "
          f"{a.workdir}/run/*/*/*/curves.png, results: {a.workdir}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
