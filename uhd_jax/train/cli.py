"""What uhd-train and uhd-check-data share on the command line: the experiment config with its
`--config.KEY=VALUE` overrides and `--data STAGE=...` sources, the stages to run, the default run directory.

Paths: one given as a flag (`--workdir`, `--data`, `--config FILE`) is relative to the current directory, as in any
command; a path inside the config (sources, image folders, tokenizer, init checkpoints) is relative to
`config.data_root` (itself relative to the current directory) unless absolute. `--config.KEY=VALUE` edits the
config, so a path set that way is read like the config's own.
"""
from __future__ import annotations

import os

from uhd_jax.cli_errors import UserError, apply_override, load_config

DATA_HELP = ("STAGE=FILE.json:IMAGE_FOLDER[:WEIGHT] (a JBU stage: STAGE=IMAGE_FOLDER); replaces the stage's sources "
             "in the config; repeat for a mixture; paths relative to the current directory")


def add_config_arguments(parser, *, stages_help: str = "stages to run, comma-separated (default: config.stage_order)"):
    parser.add_argument("--config", required=True, help="experiment config: configs/NAME.py[:variant]")
    parser.add_argument("--data", action="append", default=[], metavar="STAGE=FILE.json:IMAGE_FOLDER", help=DATA_HELP)
    if stages_help:
        parser.add_argument("--stages", type=lambda s: [x for x in s.split(",") if x], default=None,
                            help=stages_help)


def parse_data(item: str, config) -> tuple[str, dict]:
    """`STAGE=FILE.json:IMAGE_FOLDER[:WEIGHT]` -> (stage, source entry with absolute paths). A JBU stage reads image
    folders alone: `STAGE=IMAGE_FOLDER`."""
    stage, eq, spec = item.partition("=")
    usage = f"--data {item}: write STAGE=FILE.json:IMAGE_FOLDER[:WEIGHT], e.g. --data sft=mix665k.json:images/"
    if not eq or not stage or not spec:
        raise UserError(usage)
    if stage not in config.stages:
        raise UserError(f"--data {item}: unknown stage {stage!r}; the config has {list(config.stage_order)}")
    if config.stages[stage].get("kind", "llava") == "jbu":
        return stage, {"image_folder": os.path.abspath(spec)}
    parts = spec.split(":")
    weight = 1.0
    if len(parts) == 3:
        try:
            weight = float(parts[2])
        except ValueError:
            raise UserError(f"{usage} (the weight {parts[2]!r} is not a number)") from None
        if weight <= 0:
            raise UserError(f"--data {item}: the weight must be above 0")
    elif len(parts) != 2:
        raise UserError(f"{usage} (a path with ':' in it: set --config.stages.{stage}.sources instead)")
    json_file, folder = parts[0], parts[1]
    if not json_file:
        raise UserError(usage)
    # Made absolute here, so that config.data_root (which the config's own relative paths are under) does not apply.
    entry = {"json": os.path.abspath(json_file), "image_folder": os.path.abspath(folder) if folder else "",
             "weight": weight}
    return stage, entry


def load_run_config(spec: str, overrides: list[str], data: list[str] = ()):
    """The config with the overrides applied, then `--data`; says on stdout when an override changed a stage's
    `batch_size` from the config's, since it is the global batch and not a per-device or per-step size."""
    config = load_config(spec)
    before = {name: (int(config.stages[name].batch_size), int(config.stages[name].get("grad_accum", 1)))
              for name in config.stages if "batch_size" in config.stages[name]}
    for item in overrides:
        apply_override(config, item)
    sources: dict[str, list] = {}
    for item in data:
        stage, entry = parse_data(item, config)
        sources.setdefault(stage, []).append(entry)
    for stage, entries in sources.items():
        config.stages[stage].sources = entries
    for name, (batch, accum) in before.items():
        stage = config.stages[name]
        if int(stage.batch_size) != batch:
            print(f"note: stages.{name}.batch_size {stage.batch_size} replaces the config's {batch}: batch_size is "
                  f"the global batch (all devices and accumulation steps together), so the stage trains at "
                  f"{stage.batch_size}, not {batch}. To keep {batch} with less memory per step, leave batch_size and "
                  f"raise grad_accum instead (--config.stages.{name}.grad_accum={2 * accum}: micro-batches of "
                  f"{batch // (2 * accum)})", flush=True)
    return config


def run_order(config, stages=None) -> list[str]:
    """`stages` (default: all) in the config's `stage_order`, whatever order they were named in: a stage that
    starts from another must run after it."""
    if stages is None:
        return list(config.stage_order)
    unknown = [s for s in stages if s not in config.stage_order]
    if unknown:
        raise UserError(f"--stages: unknown stage(s) {unknown}; the config has {list(config.stage_order)}")
    return [s for s in config.stage_order if s in set(stages)]


def config_name(spec: str, config) -> str:
    """`runs/<name>`'s name: the config file's name and its variant (configs/uhd_v2.py -> uhd_v2-7b)."""
    path, _, variant = spec.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    variant = variant or config.get("variant") or ""
    return f"{name}-{variant}" if variant else name


def default_workdir(spec: str, config) -> str:
    return os.path.join("runs", config_name(spec, config))
