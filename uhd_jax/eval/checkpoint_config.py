"""The experiment config, model and tokenizer of a checkpoint directory, so that generation and evaluation need only
`--checkpoint`.

A checkpoint's config.json records the model it holds (`model`: `config.model` with the stage's overrides) and its
`family`; a trained stage's `final/` also records the `stage` and the `tokenizer` it trained with, a converted
checkpoint no tokenizer. The rest of what answering needs (prompt template, image slicing, separators) is not
recorded: it comes from the family's config file `configs/<family>.py` in the variant whose model has the
checkpoint's sizes (the variants of every family differ in them; a recorded `variant` is taken as is, and a checkpoint
that fits no variant, or several, is an error that asks for --config). An explicit `--config` is checked against the
checkpoint instead (`check_config_fits`: family and sizes).

The model that runs is always the checkpoint's. `--config.model.KEY=VALUE` may change its run settings (`RUNTIME`:
compute and parameter dtypes, the attention kernel, remat, the layer layout), e.g. `--config.model.attention_impl=cudnn`
on a GPU for a checkpoint converted on CPU; any other model override that differs from the checkpoint is an error
naming it, never a flag that is silently ignored.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import os
import re
from typing import Any

from uhd_jax.cli_errors import UserError, apply_override, find_config, load_config
from uhd_jax.config_loading import PACKAGE
from uhd_jax.train.checkpoints import CONFIG_FILE

# Settings of how a model runs, not of what it computes: overridable on any checkpoint, at the top of config.model
# (for both towers), or per tower (model.vision.KEY, model.llm.KEY) where the config has such a key.
RUNTIME = ("dtype", "param_dtype", "attention_impl", "remat_policy", "scan_layers")


@dataclasses.dataclass
class CheckpointModel:
    checkpoint: str
    meta: dict           # the checkpoint's config.json
    config: Any          # experiment ConfigDict: --config, or the family's variant with the checkpoint's model
    model: dict          # the config.model that runs: the checkpoint's, with the run-setting overrides
    model_id: str        # for answer files
    tokenizer_given: bool = False   # --config.tokenizer / --config.data_root overrides: the user's choice, not guessed


def checkpoint_name(checkpoint: str) -> str:
    """The checkpoint's model id in answer files: a trained stage's `RUN/STAGE/final` is 'RUN-STAGE' (e.g.
    runs/uhd_v2-7b/sft/final -> 'uhd_v2-7b-sft'), any other directory its own name (checkpoints/llava15-7b-init)."""
    parent, name = os.path.split(os.path.normpath(os.path.abspath(checkpoint)))
    if name != "final":
        return name
    run, stage = os.path.split(parent)
    run = os.path.basename(run)
    return f"{run}-{stage}" if run and stage else stage or name


def _meta_file(checkpoint: str) -> str:
    return os.path.join(checkpoint, CONFIG_FILE)


def config_variants(path: str) -> list[str]:
    """The variants a config file accepts. No config lists them in one place, but every one names its choices in the
    error for an unknown variant ('... choose one of [...]'), so they are read from there; [] when that fails."""
    from uhd_jax.config_loading import load_config as load

    try:
        load(f"{path}:?")
    except ValueError as e:
        found = re.search(r"choose one of (\[[^\]]*\])", str(e))
        if found:
            try:
                return [str(v) for v in ast.literal_eval(found.group(1))]
            except (ValueError, SyntaxError):
                pass
    return []


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def family_config(meta: dict, checkpoint: str):
    """The experiment config of a checkpoint without --config: its family's config file in the variant of its sizes,
    with the checkpoint's model (keys the checkpoint lacks, e.g. run settings of a converted one, keep the config's
    values so that they can be overridden)."""
    import ml_collections

    from uhd_jax.eval.model_vqa import config_difference

    where = _meta_file(checkpoint)
    family = meta.get("family")
    if not family:
        raise UserError(f"{where} records no 'family' (a converted LLM or vision tower alone?); pass --config "
                        f"configs/NAME.py:VARIANT for the model it holds")
    try:
        path = find_config(f"configs/{family}.py").partition(":")[0]
    except UserError:
        raise UserError(f"{where} records family {family!r}, but configs/{family}.py is neither in {os.getcwd()} nor "
                        f"in {PACKAGE}; pass --config with the checkpoint's config file") from None
    if meta.get("variant"):
        from uhd_jax.config_loading import load_config as load

        try:
            config = load(f"{path}:{meta['variant']}")
        except (ValueError, KeyError, AttributeError) as e:
            raise UserError(f"{where} records variant {meta['variant']!r}, which {path} does not build ({e}); pass "
                            f"--config configs/{family}.py:VARIANT") from None
    else:
        fits, misses = [], []
        for variant in config_variants(path):
            candidate = load_config(f"{path}:{variant}")
            miss = config_difference(candidate, meta)
            if miss:
                misses.append(f"{variant!r}: {miss}")
            else:
                fits.append((variant, candidate))
        if len(fits) != 1:
            which = (f"fits variants {[v for v, _ in fits]}" if fits else
                     f"fits no variant (e.g. {misses[0]})" if misses else "fits no variant (none found)")
            raise UserError(f"{where}: its model {which} of configs/{family}.py; pass --config "
                            f"configs/{family}.py:VARIANT (with the --config.KEY=VALUE overrides it was trained with)")
        (_, config), = fits
    config.model = ml_collections.ConfigDict(_merge(config.model.to_dict(), meta["model"]))
    return config


def field_at(node, dotted: str):
    """node["a"]["b"] for "a.b" in dicts or ConfigDicts; None where a part is missing."""
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node.keys():
            return None
        node = node[part]
    return node


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def is_runtime(key: str) -> bool:
    """Whether `key` ('model.attention_impl', 'model.llm.dtype') is a run setting of the model."""
    parts = key.split(".")
    if parts[0] != "model" or parts[-1] not in RUNTIME:
        return False
    return len(parts) == 2 or (len(parts) == 3 and parts[1] in ("vision", "llm") and parts[2] != "scan_layers")


def experiment(checkpoint: str, spec: str | None = None, overrides=(), *, model_id: str | None = None,
               flag: str = "--config") -> CheckpointModel:
    """The checkpoint's experiment config and model (see the module doc), checked without reading the parameters.
    `spec`: an explicit configs/NAME.py[:variant], which must describe the checkpoint's model; `overrides`:
    'KEY=VALUE' items (--config.KEY=VALUE)."""
    from uhd_jax.eval.model_vqa import check_config_fits, read_meta
    from uhd_jax.models.config import vlm_config

    given = load_config(spec, flag=flag) if spec else None   # a typo in the command before a look at the files
    meta = read_meta(checkpoint)
    config = given if given is not None else family_config(meta, checkpoint)
    for item in overrides:
        apply_override(config, item)
    model = copy.deepcopy(meta["model"])
    for item in overrides:
        key = item.partition("=")[0]
        if not key.startswith("model."):
            continue
        value = _plain(field_at(config, key))
        if is_runtime(key):
            *path, name = key.split(".")[1:]
            node = model
            for part in path:
                node = node.setdefault(part, {})
            node[name] = value
            if not path:   # the whole model's setting: a tower's own value recorded in the checkpoint would win
                for tower in ("vision", "llm"):
                    (model.get(tower) or {}).pop(name, None)
        elif value != _plain(trained := field_at(meta["model"], key[len("model."):])):
            raise UserError(f"--config.{item}: the checkpoint's {key} is {trained!r} "
                            f"({_meta_file(checkpoint)}) and its model cannot change; of the model only the run "
                            f"settings ({', '.join(RUNTIME)}) can be overridden")
    check_config_fits(config, meta, checkpoint)
    try:
        vlm_config(model)
    except (ValueError, TypeError) as e:   # e.g. --config.model.dtype=float64
        raise UserError(f"the model to run ({_meta_file(checkpoint)} with the --config.model overrides): {e}") \
            from None
    tokenizer_given = any(item.partition("=")[0] in ("tokenizer", "data_root") for item in overrides)
    return CheckpointModel(checkpoint, meta, config, model, model_id or checkpoint_name(checkpoint), tokenizer_given)


def check_runs_here(model: dict) -> None:
    """cuDNN attention runs only on an NVIDIA GPU and in half precision: a UserError saying which flag to add, before
    the parameters load, instead of a traceback from the first compiled call."""
    import jax
    import jax.numpy as jnp

    from uhd_jax.models.config import vlm_config

    cfg = vlm_config(model)
    for name, tower in (("vision", cfg.vision), ("llm", cfg.llm)):
        if tower.attention_impl != "cudnn":
            continue
        if jax.default_backend() != "gpu":
            raise UserError(f"model.{name} attention_impl is 'cudnn', which needs an NVIDIA GPU, and JAX runs on "
                            f"{jax.default_backend()} here; pass --config.model.attention_impl=xla")
        if tower.dtype not in (jnp.bfloat16, jnp.float16):
            raise UserError(f"model.{name} attention_impl is 'cudnn', which computes in bfloat16 or float16, and the "
                            f"model's dtype is {jnp.dtype(tower.dtype).name}; add --config.model.dtype=bfloat16")


def _recorded_candidates(recorded: str, checkpoint: str) -> list[str]:
    if os.path.isabs(recorded):
        return [recorded]
    # Training resolved it against config.data_root and then against the directory it ran in, which is not recorded:
    # the current directory, then the checkpoint's parent folders (a run's workdir usually lies under that directory).
    dirs, d = [os.getcwd()], os.path.dirname(os.path.abspath(checkpoint))
    while d not in dirs:
        dirs.append(d)
        d = os.path.dirname(d)
    return [os.path.join(d, recorded) for d in dirs]


def choose_tokenizer(src: CheckpointModel, tokenizer: str | None = None, data_root: str | None = None) -> str:
    """Point `src.config.tokenizer` at the tokenizer directory to use (absolute) and return it: --tokenizer; else
    the config's under --data-root (or as --config.tokenizer / --config.data_root set it); else the one the checkpoint
    records, then the config's. A UserError saying where it was looked for when none is a directory."""
    from uhd_jax.train.trainer import _resolve

    config = src.config
    if tokenizer:
        if not os.path.isdir(tokenizer):
            raise UserError(f"--tokenizer {tokenizer} not found; give the tokenizer directory the model was trained "
                            f"with")
        config.tokenizer = os.path.abspath(tokenizer)
        return config.tokenizer
    if data_root:
        config.data_root = os.path.abspath(data_root)
    configured = _resolve(config.tokenizer, config) if config.get("tokenizer") else ""
    if data_root or src.tokenizer_given:
        if not configured or not os.path.isdir(configured):
            raise UserError(f"tokenizer {configured or '(none)'} not found (config.tokenizer "
                            f"{config.get('tokenizer')!r} under data root {config.get('data_root')!r}); pass "
                            f"--tokenizer DIR or the --data-root it is under")
        config.tokenizer = os.path.abspath(configured)
        return config.tokenizer
    recorded = src.meta.get("tokenizer") or ""
    candidates = (_recorded_candidates(recorded, src.checkpoint) if recorded else []) + [configured] * bool(configured)
    path = next((c for c in candidates if os.path.isdir(c)), None)
    if path is None:
        where = _meta_file(src.checkpoint)
        theirs = (f"{where} records tokenizer {recorded!r}, which is neither in {os.getcwd()} nor in the "
                  f"checkpoint's parent folders" if recorded else f"{where} records no 'tokenizer'")
        ours = f"the config's {configured} is not a directory" if configured else "the config names none"
        raise UserError(f"tokenizer not found: {theirs}, and {ours}; pass --tokenizer DIR (the tokenizer the model "
                        f"was trained with)")
    config.tokenizer = os.path.abspath(path)
    return config.tokenizer
