"""One command per paper table: the benchmarks of a paper's table, where each one's released files sit under a data
root, which are there, and the table in the paper's column order beside the published numbers.

Layout under the data root (LLaVA's playground/data/eval names where LLaVA's scripts fix them; `{name}/questions.jsonl,
images/, annotations.json` for the benchmarks whose question files come from elsewhere, e.g. the UHD v2 eval set):
see `LAYOUT`. Published numbers come from the specs (llava15_slime_llavar.md §B.6: LLaVA-1.5 MODEL_ZOO, verified;
uhd.md §8: LLaVA-UHD numbers quoted in the issues, unverified against the PDFs). Where the spec has no number the
cell stays empty; the full LLaVA-UHD v2 and SliME tables could not be retrieved (specs' "could not determine"), so
their column lists follow the benchmarks the specs say those papers evaluate, not a verified column order.
"""
from __future__ import annotations

import dataclasses
import os

from uhd_jax.cli_errors import UserError


@dataclasses.dataclass(frozen=True)
class Layout:
    questions: str = ""      # a model_vqa question file (empty: built from `source` by benchmark_formats)
    images: str = ""
    annotations: str = ""
    source: str = ""         # the released file or folder benchmark_formats reads

    def paths(self) -> list[str]:
        return [p for p in (self.questions, self.images, self.annotations, self.source) if p]


LAYOUT = {
    "vqav2": Layout("vqav2/questions.jsonl", "vqav2/images", "vqav2/annotations.json"),
    "gqa": Layout("gqa/llava_gqa_testdev_balanced.jsonl", "gqa/data/images",
                  "gqa/data/testdev_balanced_questions.json"),
    "textvqa": Layout("textvqa/llava_textvqa_val_v051_ocr.jsonl", "textvqa/train_images",
                      "textvqa/TextVQA_0.5.1_val.json"),
    "pope": Layout("pope/llava_pope_test.jsonl", "pope/val2014", "pope/annotations.json"),
    "mme": Layout("MME/llava_mme.jsonl", "MME/MME_Benchmark_release_version", "MME/MME_Benchmark_release_version"),
    "docvqa": Layout("docvqa/questions.jsonl", "docvqa/images", "docvqa/annotations.jsonl"),
    "chartqa": Layout("chartqa/questions.jsonl", "chartqa/images", "chartqa/annotations.jsonl"),
    "ai2d": Layout("ai2d/questions.jsonl", "ai2d/images", "ai2d/annotations.jsonl"),
    "scienceqa": Layout(source="scienceqa"),
    "mmbench": Layout(source="mmbench/mmbench_dev_20230712.tsv"),
    "mmbench_cn": Layout(source="mmbench/mmbench_dev_cn_20231003.tsv"),
    "seed": Layout(source="seed_bench"),
    "mmmu": Layout(source="MMMU"),
    "ocrbench": Layout(source="OCRBench"),
    "realworldqa": Layout(source="realworldqa"),
    "hrbench4k": Layout(source="HR-Bench/hr_bench_4k.tsv"),
    "hrbench8k": Layout(source="HR-Bench/hr_bench_8k.tsv"),
    "vizwiz": Layout(source="vizwiz"),          # val.json (scored here) or test.json (upload file only)
    "llava_bench": Layout(source="llava-bench-in-the-wild"),
    "mmvet": Layout(source="mm-vet"),
}


@dataclasses.dataclass(frozen=True)
class Suite:
    title: str
    columns: tuple[tuple[str, str], ...]          # (column label, benchmark)
    published: dict                               # row label -> {column label: number}
    notes: tuple[str, ...] = ()


SEED_NOTE = ("SEED: LLaVA's published number covers SEED-Bench's image and video questions; this project answers and "
             "scores the image questions (SEED-IMG)")
SUITES = {
    "llava15": Suite(
        "LLaVA-1.5 (MODEL_ZOO.md, spec llava15_slime_llavar.md §B.6)",
        (("VQAv2", "vqav2"), ("GQA", "gqa"), ("VizWiz", "vizwiz"), ("SQA-IMG", "scienceqa"), ("TextVQA", "textvqa"),
         ("POPE", "pope"), ("MME", "mme"), ("MMB", "mmbench"), ("MMB-CN", "mmbench_cn"), ("SEED", "seed"),
         ("LLaVA-W", "llava_bench"), ("MM-Vet", "mmvet")),
        {"LLaVA-1.5-7B": {"VQAv2": 78.5, "GQA": 62.0, "VizWiz": 50.0, "SQA-IMG": 66.8, "TextVQA": 58.2, "POPE": 85.9,
                          "MME": 1510.7, "MMB": 64.3, "MMB-CN": 58.3, "SEED": 58.6, "LLaVA-W": 65.4, "MM-Vet": 31.1},
         "LLaVA-1.5-13B": {"VQAv2": 80.0, "GQA": 63.3, "VizWiz": 53.6, "SQA-IMG": 71.6, "TextVQA": 61.3, "POPE": 85.9,
                           "MME": 1531.3, "MMB": 67.7, "MMB-CN": 63.6, "SEED": 61.6, "LLaVA-W": 72.5,
                           "MM-Vet": 36.1}},
        (SEED_NOTE, "VQAv2 and VizWiz are published on their test-dev servers; locally they score on the annotations "
                    "given (val)")),
    "uhd_v1": Suite(
        "LLaVA-UHD v1 13B (numbers quoted in thunlp/LLaVA-UHD issue #1, spec uhd.md §8; unverified against the PDF)",
        (("VQAv2", "vqav2"), ("GQA", "gqa"), ("TextVQA", "textvqa"), ("SQA-IMG", "scienceqa"), ("VizWiz", "vizwiz"),
         ("MMMU", "mmmu"), ("MME", "mme"), ("POPE", "pope"), ("MMB", "mmbench")),
        {"LLaVA-UHD-13B": {"VQAv2": 81.7, "GQA": 65.2, "TextVQA": 67.7, "SQA-IMG": 72.0, "VizWiz": 56.1, "MMMU": 36.4,
                           "MME": 1535}}),
    "uhd_v2": Suite(
        "LLaVA-UHD v2 (the benchmarks of its eval scripts, spec uhd.md §8; the paper's column order and numbers could "
        "not be retrieved)",
        (("MME", "mme"), ("GQA", "gqa"), ("AI2D", "ai2d"), ("SQA-IMG", "scienceqa"), ("VizWiz", "vizwiz"),
         ("MMB", "mmbench"), ("SEED", "seed"), ("MMMU", "mmmu"), ("TextVQA", "textvqa"), ("DocVQA", "docvqa"),
         ("ChartQA", "chartqa"), ("OCRBench", "ocrbench"), ("RealWorldQA", "realworldqa"), ("HR-4K", "hrbench4k"),
         ("HR-8K", "hrbench8k"), ("POPE", "pope")),
        {"LLaVA-UHD v2 (Qwen2-7B)": {"TextVQA": 70.6}},
        ("TextVQA 70.6: the released Qwen2-7B checkpoint (issue #33; a user reproduced 68.92)",)),
    "slime": Suite(
        "SliME (its users evaluate through VLMEvalKit / lmms-eval; the paper's per-benchmark table could not be "
        "retrieved, spec §C.10)",
        (("MME", "mme"), ("MMB", "mmbench"), ("SEED", "seed"), ("MMMU", "mmmu"), ("TextVQA", "textvqa"),
         ("GQA", "gqa"), ("SQA-IMG", "scienceqa"), ("POPE", "pope"), ("MM-Vet", "mmvet"), ("LLaVA-W", "llava_bench"),
         ("RealWorldQA", "realworldqa"), ("OCRBench", "ocrbench")),
        {}),
}


def suite(name: str) -> Suite:
    if name not in SUITES:
        raise UserError(f"unknown suite {name!r}; choose from {sorted(SUITES)}")
    return SUITES[name]


def plan(name: str, data_root: str) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(present (label, benchmark) columns, {benchmark: first missing path} for the absent ones)."""
    if not os.path.isdir(data_root):
        raise UserError(f"--data-root {data_root}: not a directory; give the folder the benchmarks are under")
    present, missing = [], {}
    for label, bench in suite(name).columns:
        absent = next((p for p in LAYOUT[bench].paths() if not os.path.exists(os.path.join(data_root, p))), None)
        if absent is None:
            present.append((label, bench))
        else:
            missing[bench] = absent
    return present, missing


def _cell(value, width):
    if value is None:
        return f"{'-':>{width}}"
    return f"{value:>{width}.1f}"


def table(name: str, scores: dict[str, float], row_label: str = "this run") -> str:
    """The suite's table: this run's headline scores (benchmark -> number) and the published rows, in the paper's
    column order; '-' where there is no number."""
    s = suite(name)
    labels = [label for label, _ in s.columns]
    first = max([len(row_label)] + [len(r) for r in s.published]) + 2
    widths = [max(len(label), 7) + 1 for label in labels]
    lines = [s.title, f"{'':<{first}}" + "".join(f"{label:>{w}}" for label, w in zip(labels, widths))]
    lines.append(f"{row_label:<{first}}" + "".join(_cell(scores.get(b), w) for (_, b), w in zip(s.columns, widths)))
    for row, numbers in s.published.items():
        lines.append(f"{row:<{first}}" + "".join(_cell(numbers.get(label), w) for label, w in zip(labels, widths)))
    lines += [f"  note: {n}" for n in s.notes]
    return "\n".join(lines)


def inputs(bench: str, data_root: str, out_dir: str):
    """(question file, image folder, annotations) of a present benchmark; released files are converted into
    `out_dir` first."""
    from uhd_jax.eval.benchmark_formats import prepare

    lay = LAYOUT[bench]
    if lay.source:
        p = prepare(bench, os.path.join(data_root, lay.source), out_dir)
        return p.questions, p.image_folder, p.annotations
    return tuple(os.path.join(data_root, x) for x in (lay.questions, lay.images, lay.annotations))


def run(name: str, data_root: str, workdir: str, answer=None, judge=None, log=print) -> dict:
    """Answer (with `answer(benchmark, questions, image_folder, answers_path)`, when given) and score every benchmark
    of the suite present under `data_root`; answers and scores go to `workdir/<benchmark>/`. Without `answer` the
    answer files already there are scored. Returns {'scores', 'results', 'missing', 'skipped'}."""
    from uhd_jax.eval import submissions
    from uhd_jax.eval.answers import read_answers
    from uhd_jax.eval.scoring import JUDGED, score_answers

    present, missing = plan(name, data_root)
    results, skipped = {}, {}
    for label, bench in present:
        out = os.path.join(workdir, bench)
        try:
            questions, images, annotations = inputs(bench, data_root, out)
            answers_path = os.path.join(out, "answers.jsonl")
            if answer is not None:
                answer(bench, questions, images, answers_path)
            answers = read_answers(answers_path)
            if not answers:
                skipped[bench] = f"no answers in {answers_path} (give --checkpoint to answer the questions)"
                continue
            try:   # the file the benchmark's server or own tool reads
                upload = submissions.write(bench, answers, annotations, out)
            except UserError as e:
                upload = None
                log(f"{label}: no upload file ({e})")
            if submissions.server_only(bench, annotations):
                skipped[bench] = f"test split: upload {upload} to the benchmark's server"
                continue
            if bench in JUDGED and judge is None:
                skipped[bench] = "judged by GPT: give --judge-url and --judge-model (answers are written)"
                continue
            results[bench] = score_answers(bench, answers, annotations, judge=judge,
                                           reviews_path=os.path.join(out, "reviews.jsonl"))
            log(f"{label}: {results[bench]['score']:.2f} ({results[bench]['scored']} of "
                f"{results[bench]['answers']} answers scored)")
        except UserError as e:   # one benchmark's broken files do not stop the others
            skipped[bench] = str(e)
    return {"scores": {b: r["score"] for b, r in results.items()}, "results": results, "missing": missing,
            "skipped": skipped}


def report(name: str, outcome: dict, data_root: str) -> str:
    lines = [table(name, outcome["scores"])]
    if outcome["missing"]:
        lines.append(f"\nmissing under {data_root} (not run):")
        lines += [f"  {b:<12} {os.path.join(data_root, p)}" for b, p in outcome["missing"].items()]
    if outcome["skipped"]:
        lines.append("\nnot scored:")
        lines += [f"  {b:<12} {why}" for b, why in outcome["skipped"].items()]
    return "\n".join(lines)
