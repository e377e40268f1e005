"""Score answers with a benchmark's official rule, or run the synthetic high-resolution reading benchmark.

  uhd-evaluate --benchmark textvqa --answers answers/textvqa.jsonl --annotations TextVQA_0.5.1_val.json
  uhd-evaluate --benchmark synthetic_reading --checkpoint runs/demo/run/uhd_v2/seed0/sft/final \
      --workdir runs/reading
  # several models on the same images, one chart: repeat --checkpoint (and --name), or --config/--checkpoint in pairs;
  # --config.KEY=VALUE overrides apply to every model (of the model, only its run settings: uhd-generate)

  # GPT-judged benchmarks (LLaVA-Bench, MM-Vet) through any OpenAI-compatible endpoint; the key from $OPENAI_API_KEY
  uhd-evaluate --benchmark mmvet --answers answers/mmvet.jsonl --annotations mm-vet/mm-vet.json \
      --judge-url https://api.openai.com/v1 [--judge-model gpt-4-0613]
  # a released benchmark (TSV, JSON) into a question file for uhd-generate, then score the answers as above
  uhd-evaluate --benchmark mmbench --prepare mmbench_dev_20230712.tsv --out runs/prepared/mmbench
  # one paper table: answer and score every benchmark of the suite present under --bench-root, list the missing
  uhd-evaluate --suite uhd_v2 --bench-root data/eval --checkpoint runs/uhd_v2-7b/sft/final --workdir runs/table
  uhd-evaluate --suite llava15 --bench-root data/eval --workdir runs/table    # score the answers already there
  # the reading benchmark as lmms-eval tasks, answered by our model inside lmms-eval (`pip install 'uhd-jax[lmms]'`
  # and `pip install --no-deps lmms-eval==0.7.3`)
  uhd-evaluate --benchmark synthetic_reading --lmms-tasks runs/lmms
  lmms-eval --model uhd_jax --model_args checkpoint=runs/uhd_v2-7b/sft/final,benchmark=synthetic_reading \
      --include_path runs/lmms/tasks --tasks uhd_synthetic_reading

Results go to a JSON file next to the answers (`<answers>.scores.json`, `<workdir>/results.json` with a bar chart
`<workdir>/results.png` of accuracy per resolution bucket, or `<workdir>/suite_<name>.json`) and a table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from absl import flags, logging  # noqa: E402

flags.FLAGS.mark_as_parsed()
logging.set_verbosity(logging.WARNING)

from uhd_jax.cli_errors import UserError, reports_user_errors, require_file, split_overrides  # noqa: E402
from uhd_jax.eval.benchmarks import BENCHMARKS  # noqa: E402


def print_scores(result: dict) -> None:
    print(f"{result['benchmark']}: {result['score']:.2f}  ({result['scored']} of {result['answers']} answers scored"
          + (f"; {result['unmatched_count']} without annotation, e.g. {result['unmatched'][:3]}"
             if result["unmatched_count"] else "") + ")")
    for key, value in result["metrics"].items():
        if isinstance(value, dict):
            print(f"  {key:<24}" + "  ".join(f"{k}={v:.4g}" for k, v in value.items()))
        else:
            print(f"  {key:<24}{value:.2f}")


JUDGE_MODELS = {"llava_bench": "gpt-4-0314", "mmvet": "gpt-4-0613"}   # the official scripts' judges


def judge_for(a):
    """A function benchmark -> Judge for --judge-url (None without it); the official judge model unless
    --judge-model names another."""
    if not a.judge_url:
        return None
    from uhd_jax.eval.judge import Judge

    return lambda bench: Judge(a.judge_url, a.judge_model or JUDGE_MODELS.get(bench, "gpt-4-0613"),
                               key_env=a.judge_key_env)


def score_file(a) -> int:
    from uhd_jax.eval.answers import read_answers
    from uhd_jax.eval.scoring import score_answers

    require_file(a.answers, "--answers", "give the answer file uhd-generate wrote")
    answers = read_answers(a.answers)
    if not answers:
        raise UserError(f"--answers {a.answers}: no answers to score; run uhd-generate first")
    if not os.path.exists(a.annotations):   # MME, ScienceQA, LLaVA-Bench: their release folder
        raise UserError(f"--annotations {a.annotations}: not found; give the {a.benchmark} annotation file or folder")
    judges = judge_for(a)
    from uhd_jax.eval import submissions

    # the file the benchmark's server or own tool reads, beside the answers
    upload = submissions.write(a.benchmark, answers, a.annotations, a.answers + ".upload")
    if upload:
        print(f"{a.benchmark} upload file -> {upload}")
    if submissions.server_only(a.benchmark, a.annotations):
        print(f"{a.annotations} is a test split without answers: upload {upload} to the benchmark's server")
        return 0
    result = score_answers(a.benchmark, answers, a.annotations, judge=judges(a.benchmark) if judges else None,
                           reviews_path=a.answers + ".reviews.jsonl")
    print_scores(result)
    out = a.out or a.answers + ".scores.json"
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"scores -> {out}")
    return 0


def lmms_tasks(a) -> int:
    """The reading benchmark as local lmms-eval tasks (no model runs here)."""
    from uhd_jax.integrations.lmms_task import CHOICE, GENERATE, write_tasks

    if a.per_bucket < 1 or any(s < 1 for s in a.sides) or (a.max_new_tokens is not None and a.max_new_tokens < 1):
        raise UserError(f"--per-bucket {a.per_bucket} --sides {a.sides} --max-new-tokens {a.max_new_tokens}: give "
                        f"positive numbers")
    out = write_tasks(a.lmms_tasks, a.per_bucket, tuple(a.sides), max_new_tokens=a.max_new_tokens or 128)
    print(f"tasks {GENERATE}, {CHOICE} -> {out['include_path']}\nrun: lmms-eval --model uhd_jax --model_args "
          f"checkpoint=CKPT,benchmark=synthetic_reading --include_path {out['include_path']} --tasks {GENERATE}")
    return 0


def synthetic_reading(a) -> int:
    import types

    from uhd_jax.cli.generate import answering_for, check_model, load
    from uhd_jax.eval import synthetic_bench
    from uhd_jax.eval.answers import read_answers, read_questions
    from uhd_jax.eval.checkpoint_config import checkpoint_name
    from uhd_jax.eval.model_vqa import answer_questions

    checkpoints, configs = a.checkpoint or [], a.config or []
    if not checkpoints or (configs and len(configs) != len(checkpoints)):
        raise UserError("synthetic_reading needs --checkpoint once per model (with --config: one per --checkpoint, "
                        "in pairs)")
    configs = configs or [None] * len(checkpoints)
    names = a.name or [checkpoint_name(k) if c is None else os.path.basename(c.split(":")[0]).removesuffix(".py")
                       + (":" + c.split(":")[1] if ":" in c else "") for c, k in zip(configs, checkpoints)]
    if len(names) != len(checkpoints) or len(set(names)) != len(names):
        raise UserError(f"--name: one distinct name per model, got {names} for {len(checkpoints)} model(s)")
    if a.per_bucket < 1 or any(s < 1 for s in a.sides):
        raise UserError(f"--per-bucket {a.per_bucket} --sides {a.sides}: give positive numbers")
    runs = [(name, config, checkpoint, types.SimpleNamespace(**{**vars(a), "config": config, "checkpoint": checkpoint}))
            for name, config, checkpoint in zip(names, configs, checkpoints)]
    for *_, args in runs:   # a mistake in the last pair stops the run before the first model's answers
        check_model(args)
    os.makedirs(a.workdir, exist_ok=True)
    paths = synthetic_bench.build(os.path.join(a.workdir, "bench"), a.per_bucket, tuple(a.sides))
    questions = read_questions(paths["questions"])
    results = {}
    for name, config, checkpoint, args in runs:
        model = load(args)
        answering = answering_for(model, args, "synthetic_reading", paths["images"])
        answers_path = os.path.join(a.workdir, f"answers_{name.replace(':', '_').replace('/', '_')}.jsonl")
        summary = answer_questions(answering, questions, answers_path, log=lambda *_: None)
        results[name] = synthetic_bench.score(read_answers(answers_path), paths["annotations"])
        results[name].update(config=config, checkpoint=checkpoint, compilations=summary["compilations"],
                             skipped=len(summary["skipped"]), answer_seconds=summary["seconds"])
        print(f"{name}: {summary['answered_now']} answered in {summary['seconds']:.0f}s, "
              f"{summary['compilations']} compilation(s), {len(summary['skipped'])} skipped")
    sides = sorted({s for r in results.values() for s in r["buckets"]})
    print(f"\nsynthetic_reading, exact match % per image long side ({a.per_bucket} questions each):")
    print(f"  {'model':<20}" + "".join(f"{str(s) + 'px':>9}" for s in sides) + f"{'all':>9}")
    for name, r in results.items():
        print(f"  {name:<20}" + "".join(f"{r['buckets'][s]['exact']:9.1f}" if s in r["buckets"] else f"{'-':>9}"
                                        for s in sides) + (f"{r['overall']['exact']:9.1f}" if r["overall"]
                                                           else f"{'-':>9}"))
    with open(os.path.join(a.workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    png = synthetic_bench.bar_chart(results, os.path.join(a.workdir, "results.png"))
    print(f"results -> {a.workdir}/results.json, chart -> {png}")
    return 0


def run_suite(a) -> int:
    from uhd_jax.eval import suites

    if not a.bench_root:
        raise UserError(f"--suite {a.suite}: give --bench-root, the folder the benchmarks' files are under")
    if a.checkpoint and len(a.checkpoint) > 1 or (a.config and len(a.config) > 1):
        raise UserError("--suite answers with one model: give --checkpoint (and --config) once")
    answer = None
    if a.checkpoint:
        import types

        from uhd_jax.cli.generate import answering_for, check_model, load
        from uhd_jax.eval.answers import read_questions
        from uhd_jax.eval.model_vqa import answer_questions

        args = types.SimpleNamespace(**{**vars(a), "checkpoint": a.checkpoint[0],
                                        "config": a.config[0] if a.config else None})
        check_model(args)
        model = []

        def answer(bench, questions, images, answers_path):
            if not model:   # loaded once, and only when a benchmark is there to answer
                model.append(load(args))
            summary = answer_questions(answering_for(model[0], args, bench, images), read_questions(questions),
                                       answers_path, log=lambda *_: None)
            print(f"{bench}: {summary['answered_now']} answered now, {summary['answered_before']} before, "
                  f"{len(summary['skipped'])} skipped, {summary['seconds']:.0f}s")
    suites.suite(a.suite)
    outcome = suites.run(a.suite, a.bench_root, a.workdir, answer=answer, judge=judge_for(a))
    print(suites.report(a.suite, outcome, a.bench_root))
    os.makedirs(a.workdir, exist_ok=True)
    out = os.path.join(a.workdir, f"suite_{a.suite}.json")
    with open(out, "w") as f:
        json.dump(outcome, f, indent=2)
    print(f"results -> {out}")
    return 0


@reports_user_errors
def main(argv=None) -> int:
    from uhd_jax.cli.generate import add_model_flags
    from uhd_jax.eval.suites import SUITES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", choices=sorted(b for b in BENCHMARKS if b != "open"), metavar="NAME",
                   help="one of: " + ", ".join(sorted(b for b in BENCHMARKS if b != "open")))
    p.add_argument("--suite", choices=sorted(SUITES), help="a paper's table: " + ", ".join(sorted(SUITES)))
    p.add_argument("--bench-root", help="with --suite: the folder the benchmarks' files are under "
                                        "(layout: uhd_jax/eval/suites.py LAYOUT)")
    p.add_argument("--judge-url", help="OpenAI-compatible endpoint for LLaVA-Bench / MM-Vet, e.g. "
                                       "https://api.openai.com/v1")
    p.add_argument("--judge-model", help="default: the official judge (gpt-4-0314 LLaVA-Bench, gpt-4-0613 MM-Vet)")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--answers", help="answer file to score (with --annotations)")
    p.add_argument("--annotations", help="the benchmark's annotation file (MME: its release folder)")
    p.add_argument("--out", default=None, help="scores JSON (default: <answers>.scores.json); with --prepare: the "
                                               "folder for the question file and images")
    p.add_argument("--prepare", metavar="RELEASED", help="convert the benchmark's released file or folder (e.g. "
                                                          "mmbench_dev_20230712.tsv) into a question file for "
                                                          "uhd-generate (uhd_jax/eval/benchmark_formats.py)")
    models = argparse.ArgumentParser(add_help=False)
    add_model_flags(models)
    for action in models._actions:   # the model flags, repeatable here for side-by-side runs
        if action.dest in ("config", "checkpoint"):
            p.add_argument(*action.option_strings, action="append", help=action.help)
        elif action.dest != "help":
            p.add_argument(*action.option_strings, default=action.default, type=action.type, help=action.help)
    p.add_argument("--name", action="append", help="label per model (default: the config, or the checkpoint's name)")
    p.add_argument("--workdir", default="runs/synthetic_reading")
    p.add_argument("--lmms-tasks", metavar="DIR", help="with synthetic_reading: write it as local lmms-eval tasks "
                                                        "(uhd_jax/integrations/lmms_task.py) instead of running it")
    p.add_argument("--per-bucket", type=int, default=40)
    p.add_argument("--sides", type=int, nargs="+", default=[336, 672, 1024, 1536, 2048])
    a, extra = p.parse_known_args(argv)
    a.overrides = split_overrides(extra, p)
    if bool(a.benchmark) == bool(a.suite):
        p.error("give either --benchmark NAME or --suite NAME")
    if a.suite:
        if a.workdir == p.get_default("workdir"):
            a.workdir = os.path.join("runs", f"suite_{a.suite}")
        return run_suite(a)
    if a.prepare:
        from uhd_jax.eval.benchmark_formats import prepare

        out = a.out or os.path.join("runs", "prepared", a.benchmark)
        prepared = prepare(a.benchmark, a.prepare, out)
        print(f"questions -> {prepared.questions}\nimage folder: {prepared.image_folder}\n"
              f"annotations: {prepared.annotations}\n"
              f"next: uhd-generate --benchmark {a.benchmark} --questions {prepared.questions} --image-folder "
              f"{prepared.image_folder} --answers ANSWERS ...; then uhd-evaluate --benchmark {a.benchmark} "
              f"--answers ANSWERS --annotations {prepared.annotations}")
        return 0
    if a.lmms_tasks:
        if a.benchmark != "synthetic_reading":
            p.error("--lmms-tasks writes the synthetic_reading benchmark's lmms-eval tasks: give --benchmark "
                    "synthetic_reading")
        return lmms_tasks(a)
    if a.benchmark == "synthetic_reading":
        return synthetic_reading(a)
    if a.overrides:
        p.error(f"{' '.join('--config.' + o for o in a.overrides)}: overrides apply to the models of "
                f"synthetic_reading; scoring an answer file runs no model")
    if not (a.answers and a.annotations):
        p.error(f"--benchmark {a.benchmark} scores an answer file: give --answers and --annotations")
    return score_file(a)


if __name__ == "__main__":
    sys.exit(main())
