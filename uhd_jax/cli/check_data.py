"""A dry run over one stage's data before a long job: every sample through the training pipeline's own preparation
(Grain workers, the same skip checks, slicing and tokenization), nothing trained.

  uhd-check-data --config configs/llava15.py:7b --stage sft [--workers 8] [--report sft_data.json]
  uhd-check-data --config configs/uhd_v2.py:7b --stage sft --data sft=mix665k.json:images/ --limit 20000

Prints how many samples would be skipped and why (with examples), the image sizes and aspect ratios, slices per
image, the sequence lengths (text and image tokens) against the stage's max_length with the truncations, the
image-token budget overflows, and the steps and passes over the data that the stage's batch, epochs and skip rate
imply. `--report FILE` writes all of it, with every skipped sample's id and reason, as JSON. `--data`,
`--config.KEY=VALUE` and the path rules are uhd-train's. `--limit N` checks a seeded random subset.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from absl import flags, logging  # noqa: E402

flags.FLAGS.mark_as_parsed()  # Grain reads absl flags; this CLI parses its own
logging.set_verbosity(logging.WARNING)

from uhd_jax.cli_errors import UserError, reports_user_errors, split_overrides  # noqa: E402
from uhd_jax.train.cli import add_config_arguments, load_run_config  # noqa: E402


def stage_parts(config, name: str):
    """(record datasets, sample count per source, source names, max_length, samples per epoch) of the stage; every
    problem with its inputs (files, folders, tokenizer, template) at once as a PreflightError, as uhd-train
    reports them."""
    from uhd_jax.data.check import conversation_parts, image_parts
    from uhd_jax.data.templates import get_template
    from uhd_jax.train import trainer

    stage = config.stages[name]
    if stage.get("kind", "llava") == "jbu":
        from uhd_jax.data.jbu_images import JBUImagePreparer, folder_images

        n, problems = trainer.jbu_source_problems(config, name, stage)
        if problems:
            raise trainer.PreflightError(problems, config, [name])
        folders = [trainer._resolve(s["image_folder"], config) for s in stage.sources]
        size = int(stage.get("image_size") or config.model.vision.image_size)
        paths = folder_images(folders)
        preparer = JBUImagePreparer(size, config.data.max_image_pixels, config.data.min_image_area)
        return image_parts(paths, preparer), [len(paths)], folders, 0, len(paths)
    problems = []
    try:
        get_template(stage.template)
    except ValueError as e:
        problems.append(f"stage {name}: stages.{name}.template: {e}")
    sources = trainer.stage_sources(config, stage, name)
    problems += trainer.source_problems(name, sources)[1]
    problems = trainer.tokenizer_problems(config) + problems
    if problems:
        raise trainer.PreflightError(problems, config, [name])
    cfg = trainer.model_for_stage(config, stage)
    parts, counts = conversation_parts(sources, trainer.preparer_factory(config, stage, cfg))
    epoch = trainer.source_problems(name, sources)[0]   # weighted as the pipeline weighs its sources
    return parts, counts, [s.json for s in sources], int(stage.max_length), epoch


def plan(config, name: str, samples: int, checked: int, skipped: int) -> dict:
    """Steps the trainer will run (its own rule, over `samples` per epoch: the sources weighted) and what they amount
    to once skips are taken out: skipped samples count towards `num_epochs` (a count of samples read) but never fill
    a batch."""
    from uhd_jax.train.trainer import stage_steps

    stage = config.stages[name]
    batch = int(stage.batch_size)
    steps = stage_steps(stage, samples)
    rate = skipped / checked if checked else 0.0
    usable = samples * (1 - rate)
    return {"global_batch": batch, "grad_accum": int(stage.get("grad_accum", 1)), "steps": steps,
            "num_epochs": float(stage.get("num_epochs", 0)), "num_steps": int(stage.get("num_steps") or 0),
            "samples_per_epoch": samples, "skip_rate": rate, "usable_samples": round(usable),
            "passes_over_usable": steps * batch / usable if usable else None,
            "samples_read": round(steps * batch / (1 - rate)) if rate < 1 else None}


def histogram_lines(title: str, counts: dict, width: int = 30) -> list[str]:
    """The title, then a row per bucket from the first to the last that holds anything (the report keeps all)."""
    total = sum(counts.values()) or 1
    top = max(counts.values() or [0]) or 1
    items = list(counts.items())
    used = [i for i, (_, n) in enumerate(items) if n]
    lines = [title]
    for label, n in items[used[0]:used[-1] + 1] if used else []:
        lines.append(f"  {label:>14} {n:>9,} {100 * n / total:6.2f}%  {'#' * round(width * n / top)}")
    return lines


def summary_lines(report: dict) -> list[str]:
    r, p = report, report["plan"]
    checked, files = r["samples"], sum(r["source_samples"])
    head = (f"{report['config']} stage {report['stage']}: checked {checked:,} of {files:,} samples"
            + (" (a random subset: --limit)" if checked < files else "")
            + f" from {', '.join(f'{s} ({n:,})' for s, n in zip(r['sources'], r['source_samples']))}")
    lines = [head]
    skipped = sum(r["skipped"].values())
    lines.append(f"skipped: {skipped:,} ({100 * skipped / max(checked, 1):.2f}%)"
                 + ("" if skipped else ", none"))
    for kind, n in r["skipped"].items():
        sid, reason = r["skip_examples"][kind][0]
        lines.append(f"  {kind:<32} {n:>9,}   e.g. {sid}: {reason[:160]}")
    if r["sequence_length"]["max_length"]:
        lines.append(f"truncated (text beyond max_length {r['sequence_length']['max_length']}): {r['truncated']:,}")
        lines.append(f"image-token budget overflows (skipped, never cut): {r['image_token_overflows']:,}")
    images = r["images"]
    if images["count"]:
        lo, mid, hi = images["long_side_min_median_max"]
        lines += histogram_lines(f"images: {images['count']:,}, long side (px) min {lo} median {mid} max {hi}",
                                 images["long_side"])
        lines += histogram_lines("aspect ratio (width:height)", images["aspect_ratio_w_h"])
    if r["slices_per_image"]:
        lines += histogram_lines("slices per image (0: the image is not cut)", r["slices_per_image"])
    seq = r["sequence_length"]
    if seq["max_length"]:
        p50, p90, p99, top = seq["p50_p90_p99_max"]
        lines += histogram_lines(f"sequence length in tokens (text + image), max_length {seq['max_length']}: p50 "
                                 f"{p50} p90 {p90} p99 {p99} max {top}", seq["histogram"])
    if p["passes_over_usable"] is None:
        lines.append(f"plan: {p['steps']:,} steps of global batch {p['global_batch']}, but every sample is skipped: "
                     f"training would stop at its first batch")
    else:
        what = f"num_steps {p['num_steps']}" if p["num_steps"] else f"num_epochs {p['num_epochs']:g}"
        lines.append(f"plan: {p['steps']:,} steps of global batch {p['global_batch']} ({p['grad_accum']} accumulation "
                     f"step(s)) from {what} over {p['samples_per_epoch']:,} samples per epoch; with "
                     f"{100 * p['skip_rate']:.2f}% skipped that is {p['passes_over_usable']:.3f} passes over "
                     f"~{p['usable_samples']:,} usable samples, reading ~{p['samples_read']:,}")
    return lines


@reports_user_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s --config configs/NAME.py[:variant] --stage STAGE [--workers N] "
                                      "[--limit N] [--report FILE] [--data STAGE=FILE.json:IMAGE_FOLDER] "
                                      "[--config.KEY=VALUE ...]")
    add_config_arguments(p, stages_help="")
    p.add_argument("--stage", required=True, help="the stage whose data to check")
    p.add_argument("--workers", type=int, default=None,
                   help="Grain worker processes preparing samples (default: config.data.num_workers; 0: in-process)")
    p.add_argument("--limit", type=int, default=0, help="check a seeded random subset of this many samples")
    p.add_argument("--report", default=None, help="write the summary and every skipped sample as JSON here")
    a, extra = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    if a.workers is not None and a.workers < 0 or a.limit < 0:
        p.error("--workers and --limit take a number >= 0")
    config = load_run_config(a.config, split_overrides(extra, p), a.data)
    if a.stage not in config.stages:
        raise UserError(f"--stage {a.stage}: unknown stage; {a.config} has {list(config.stage_order)}")
    if a.report and os.path.isdir(a.report):
        raise UserError(f"--report {a.report} is a directory; give a file name")
    from tqdm import tqdm

    from uhd_jax.data.check import DataSummary, inspect_dataset

    parts, counts, names, max_length, epoch = stage_parts(config, a.stage)
    workers = int(config.data.num_workers) if a.workers is None else a.workers
    total, records = inspect_dataset(parts, workers=workers, limit=a.limit, seed=int(config.seed))
    summary = DataSummary(max_length)
    try:
        for record in tqdm(records, total=total, desc=f"checking {a.stage}", dynamic_ncols=True, mininterval=2):
            summary.add(record)
    finally:
        close = getattr(records, "close", None)
        if close:
            close()
    report = {"config": a.config, "stage": a.stage, "sources": names, "source_samples": counts,
              **summary.as_dict(), "plan": plan(config, a.stage, epoch, summary.samples,
                                                sum(summary.skipped.values()))}
    print("\n".join(summary_lines(report)), flush=True)
    if a.report:
        os.makedirs(os.path.dirname(os.path.abspath(a.report)), exist_ok=True)
        with open(a.report, "w") as f:
            json.dump({**report, "skipped_samples": [{"id": i, "reason": r} for i, r in summary.skipped_ids]}, f,
                      indent=1)
        print(f"report: {a.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
