"""Staged training: each stage of `config.stage_order` trains what `config.stages.<name>.trainable` says, on its
data, from random init overlaid with checkpoints (converter outputs and/or the previous stage), and writes
`<workdir>/<stage>/final` (a converter-compatible checkpoint) when done. A killed run resumes exactly: the train
state and the data iterator state are saved together every `save_every` steps.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from uhd_jax.cli_errors import UserError
from uhd_jax.data.batch import BatchShape
from uhd_jax.data.buckets import bucket_lengths, pad_batch
from uhd_jax.data.slicing import SlicingOptions
from uhd_jax.data.uhd_images import PackedLayout, layout_for_model
from uhd_jax.data.dataset import load_tokenizer, read_samples
from uhd_jax.data.pipeline import (DataExhausted, PreparerFactory, Source, make_iterator, skip_kinds,
                                   source_epoch_samples)
from uhd_jax.models.config import vlm_config
from uhd_jax.models import quant
from uhd_jax.models.lora import check_init_adapters
from uhd_jax.models.vlm import VLM, init_fn
from uhd_jax.parallel.mesh import make_mesh
from uhd_jax.parallel.sharding import BATCH_AXES, logical_shardings, rules_from_config
from uhd_jax.train import optimizer as opt
from uhd_jax.train.checkpoints import TrainCheckpointer, load_meta, load_params, save_params
from uhd_jax.train.cli import run_order
from uhd_jax.train.metrics_log import MetricsLog, plot_curves, read_metrics, truncate_jsonl
from uhd_jax.train.param_tree import flatten, match_layer_layout, unflatten
from uhd_jax.train.state import TrainState, opt_state_shardings
from uhd_jax.train.step import make_train_step


class TrainingDiverged(RuntimeError):
    pass


class Preempted(RuntimeError):
    """SIGTERM or SIGINT stopped the stage after a checkpoint of its last completed step; the same command resumes
    it. `signum` gives the launcher its exit status (128 + signum, as if the signal had killed it)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopRequests:
    """SIGTERM (a preemption notice on SLURM or a TPU VM) and SIGINT (Ctrl-C) ask the training loop to stop after
    the current step with a checkpoint, instead of killing the process between checkpoints and orphaning its data
    workers. A second signal stops at once (KeyboardInterrupt), without the checkpoint.

    With several processes a signal may reach some of them only, and a checkpoint save is collective: there JAX's
    preemption service (jax.distributed, on by default) owns SIGTERM and agrees on the step where all processes
    stop (`reached_preemption_sync_point`); SIGINT keeps its default."""

    def __init__(self):
        self.signum = None
        self._previous = {}
        self._multi = jax.process_count() > 1

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():   # signal handlers can only be set there
            for sig in ((signal.SIGTERM, signal.SIGINT) if not self._multi else ()):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        del frame
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after the current step, then stopping (send it "
              f"again to stop at once without one)", flush=True)

    def reached(self, step: int) -> bool:
        """Whether to stop after `step` (every process calls this at every step with the same `step`)."""
        if self._multi:
            from jax.experimental import multihost_utils

            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    self.signum = signal.SIGTERM
            except RuntimeError:   # the preemption service is disabled: no agreed stop point to wait for
                pass
        return self.signum is not None


@dataclasses.dataclass
class StageResult:
    name: str
    final_dir: str
    steps: int
    history: list
    skipped: dict
    step_compilations: int = 0   # programs the train step compiled to (static shapes: 1)


def _log0(msg: str):
    if jax.process_index() == 0:
        print(msg, flush=True)


def stage_model(config, stage, lookup_separator: bool = True) -> dict:
    """`config.model` with the stage's overrides: `stage.vision_trainable`, and `stage.model` (merged one level deep,
    e.g. SliME's runs 1a-1c: `model=dict(slime=dict(views='global', expert=0))`), and `stage.lora` (the LLM's adapters,
    `config.model.llm.lora`). A SliME separator_id of -1 is
    looked up in the tokenizer as the original does (`tokenizer(',').input_ids[-1]`) unless `lookup_separator` is
    False (shapes do not depend on it: the preflight checks rules without a tokenizer)."""
    model = config.model.to_dict()
    if "vision_trainable" in stage:
        model["vision_trainable"] = bool(stage.vision_trainable)
    for key, value in dict(stage.get("model") or {}).items():
        value = value.to_dict() if hasattr(value, "to_dict") else value
        model[key] = {**model[key], **value} if isinstance(value, dict) and isinstance(model.get(key), dict) else value
    if stage.get("lora"):   # a LoRA stage: adapters on the LLM (uhd_jax.models.lora), named by its trainable rules
        lora = stage.lora
        model["llm"] = dict(model["llm"], lora=dict(lora.to_dict() if hasattr(lora, "to_dict") else lora))
    slime = model.get("slime")
    if slime and int(slime.get("separator_id", 0)) < 0 and lookup_separator:
        tok = stage_tokenizer(config)
        model["slime"] = dict(slime, separator_id=int(tok(",", add_special_tokens=False)["input_ids"][-1]))
    return model


def model_for_stage(config, stage):
    return vlm_config(stage_model(config, stage))


def _resolve(path: str, config) -> str:
    root = config.get("data_root") or ""
    return path if os.path.isabs(path) or not root else os.path.normpath(os.path.join(root, path))


SOURCE_KEYS = ("json", "image_folder", "weight")


def stage_sources(config, stage, name: str = "") -> list[Source]:
    """The stage's data sources, paths resolved against `config.data_root`. An entry that is not
    {'json': FILE, 'image_folder': DIR, 'weight': W} (a hand-written override) is a UserError naming it."""
    where = f"stages.{name}.sources" if name else "stage.sources"
    out = []
    for i, s in enumerate(stage.sources):
        entry = dict(s) if hasattr(s, "keys") else s
        ok = isinstance(entry, dict) and isinstance(entry.get("json"), str) and entry["json"] and isinstance(
            entry.get("image_folder", ""), str) and not set(entry) - set(SOURCE_KEYS)
        weight = entry.get("weight", 1.0) if ok else None
        if not ok or isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise UserError(f"{where}[{i}] {entry!r}: expected {{'json': FILE, 'image_folder': DIR, 'weight': "
                            f"W > 0 (optional)}}")
        folder = entry.get("image_folder", "")
        out.append(Source(_resolve(entry["json"], config), _resolve(folder, config) if folder else "", float(weight)))
    if not out:
        raise UserError(f"{where} is empty: give the stage data (--data {name or 'STAGE'}=FILE.json:IMAGE_FOLDER)")
    return out


def stage_tokenizer(config):
    """The config's tokenizer with `config.data.extra_tokens` added where missing (LLaVAR). Shared, read-only: a stage
    asks for it up to three times (SliME's separator, row masks, the preparer's ids)."""
    return _tokenizer(_resolve(config.tokenizer, config), tuple(config.data.get("extra_tokens", ())))


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str, extra_tokens: tuple):
    return load_tokenizer(path, extra_tokens)


def preparer_factory(config, stage, cfg) -> PreparerFactory:
    tok = stage_tokenizer(config)
    if len(tok) > cfg.llm.vocab_size:
        raise ValueError(f"tokenizer {config.tokenizer} has {len(tok)} tokens but model.llm.vocab_size is "
                         f"{cfg.llm.vocab_size}")
    data = config.data
    ids = lambda names: tuple(tok.convert_tokens_to_ids(list(names)))  # noqa: E731
    kwargs = dict(tokenizer_path=_resolve(config.tokenizer, config), template=stage.template,
                  max_length=stage.max_length, tokens_per_image=cfg.tokens_per_image,
                  image_size=cfg.vision.image_size, max_images=data.max_images,
                  image_aspect_ratio=stage.get("image_aspect_ratio", data.image_aspect_ratio),
                  slot_id=tok.convert_tokens_to_ids(data.slot_token) if data.get("slot_token") else 0,
                  image_prefix_ids=ids(data.get("image_prefix_tokens", ())),
                  image_suffix_ids=ids(data.get("image_suffix_tokens", ())),
                  max_image_pixels=data.max_image_pixels, min_image_area=data.min_image_area, alpha=data.alpha,
                  extra_tokens=tuple(data.get("extra_tokens", ())))
    if cfg.slime is not None:
        kwargs.update(image_mode="slime", slime=cfg.slime)
    if cfg.packed_images:
        layout = packed_layout(config, cfg, stage)
        seps = dict(data.get("separator_ids", {",": 29892, "\n": 13}))
        if data.get("separator_tokens"):  # ids of the given tokens in this tokenizer (small synthetic vocabularies)
            seps = dict(zip((",", "\n"), (tok.convert_tokens_to_ids(t) for t in data.separator_tokens)))
        if any(not 0 <= i < cfg.llm.vocab_size for i in seps.values()):
            raise ValueError(f"separator ids {seps} do not fit model.llm.vocab_size={cfg.llm.vocab_size}: set "
                             f"data.separator_ids or data.separator_tokens")
        kwargs.update(image_mode="uhd", slicing=slicing_options(config, stage), schema=data.get("schema", "v1"),
                      separator_ids=tuple(sorted(seps.items())),
                      query_grid=layout.query_grid, packed=layout, seed=int(config.seed))
    return PreparerFactory(tuple(sorted(kwargs.items())))


def slicing_options(config, stage) -> SlicingOptions:
    """`config.data.slicing` with the stage's overrides (`stage.slicing`, e.g. pretraining on overviews only)."""
    merged = dict(config.data.get("slicing", {}))
    merged.update(dict(stage.get("slicing", {})))
    return SlicingOptions(**merged)


def packed_layout(config, cfg, stage=None) -> PackedLayout | None:
    """Static shapes of the packed UHD image inputs; None for fixed-size image models. A stage that trains on
    overviews only (UHD pretraining) packs one image per sample: a budget 1/(M+1) of the sliced stages'."""
    if not cfg.packed_images:
        return None
    data = config.data
    max_slices = int(dict(data.get("slicing", {})).get("max_slices", 7))
    overview_only = stage is not None and bool(dict(stage.get("slicing", {})).get("overview_only"))
    images = int(data.max_images) * (1 if overview_only else max_slices + 1)
    per_image = 1 + cfg.vision.grid ** 2
    budget = int(data.get("patch_budget") or 0)
    if overview_only:   # an explicit budget is for sliced samples; an overview has ~scale_resolution^2 area
        budget = min(budget, images * per_image) if budget else 0
    return layout_for_model(cfg, patch_budget=budget or images * per_image, max_images=images,
                            roi_taps=int(data.get("roi_taps", 16)), level_roi_taps=int(data.get("level_roi_taps", 36)),
                            box_dtype=data.get("box_dtype") or None)


# Written by the JBU (VDIM) stage beside the upsampler; only that stage uses them (the original drops them too).
DROPPED_ON_LOAD = ("vdim_objective/",)


# Vocabulary-indexed tensors and the axis that grows when a tokenizer gains tokens.
VOCAB_AXES = {"llm/embed_tokens/embedding": 0, "llm/lm_head": 1}


def grow_vocabulary(loaded: dict, model_flat: dict, src: str) -> list[str]:
    """Extend a checkpoint's embedding and lm_head to the model's vocabulary with rows equal to the mean of its rows
    (the originals' `initialize_vision_tokenizer`: LLaVAR's three image tokens on Vicuna). Returns what grew."""
    grown = []
    for key, axis in VOCAB_AXES.items():
        if key not in loaded or key not in model_flat:
            continue
        have, want = loaded[key].shape[axis], model_flat[key].shape[axis]
        if have < want:
            mean = loaded[key].mean(axis=axis, keepdims=True)
            loaded[key] = np.concatenate([loaded[key], np.repeat(mean, want - have, axis=axis)], axis=axis)
            grown.append(f"{key} {have} -> {want}")
    if grown:
        _log0(f"  init: {src}: new vocabulary rows set to the mean of the old ones ({', '.join(grown)})")
    return grown


def overlay_checkpoints(params, shardings, sources: list[str], scan_layers: bool, *, partial_model: bool = False,
                        grow_vocab: bool = False):
    """Replace parameters with those stored in each checkpoint of `sources` (partial trees allowed).

    `partial_model`: the model is a part of what the checkpoints hold (the JBU stage takes only the ViT and the
    upsampler from a full LLaVA checkpoint); other tensors are ignored instead of being an error.
    `grow_vocab`: a checkpoint with a smaller vocabulary gets mean rows for the new tokens (see grow_vocabulary)."""
    flat = flatten(params)
    flat_sh = flatten(shardings)
    for src in sources:
        meta = load_meta(src)
        loaded = {k: np.asarray(v) for k, v in flatten(jax.device_get(load_params(src))).items()}
        loaded = match_layer_layout(loaded, scanned=bool(meta["model"].get("scan_layers")), want_scanned=scan_layers)
        loaded = quant.quantize_loaded(loaded, flat)   # a QLoRA model: float base kernels quantised on load
        check_init_adapters(loaded, flat, src)   # a LoRA checkpoint's adapters must be the stage's
        if grow_vocab:
            grow_vocabulary(loaded, flat, src)
        dropped = [k for k in loaded if k.startswith(DROPPED_ON_LOAD) and k not in flat]
        unknown = [k for k in loaded if k not in flat and k not in dropped]
        if partial_model:
            dropped, unknown = dropped + unknown, []
        misshaped = [f"{k}: {loaded[k].shape} vs model {flat[k].shape}" for k in loaded
                     if k in flat and loaded[k].shape != flat[k].shape]
        if unknown or misshaped:
            raise ValueError(f"init checkpoint {src} does not fit the model: unknown {unknown[:10]}, "
                             f"mis-shaped {misshaped[:10]}")
        for k in dropped:
            del loaded[k]
        for k, v in loaded.items():
            flat[k] = jax.device_put(v.astype(flat[k].dtype), flat_sh[k])
        _log0(f"  init: {len(loaded)} tensors from {src}" + (f" ({len(dropped)} not used here)" if dropped else ""))
    return unflatten(flat)


def token_row_masks(config, stage, params, labels) -> dict:
    """`stage.trainable_token_rows`: only these tokens' rows of the input embedding learn (LLaVAR's stage 1, where the
    original detaches every other text position). Their ids come from the stage's tokenizer."""
    tokens = tuple(stage.get("trainable_token_rows", ()))
    if not tokens:
        return {}
    key = "llm/embed_tokens/embedding"
    if flatten(labels)[key] == opt.FROZEN:
        raise ValueError(f"stage.trainable_token_rows is set but {key} is frozen: give it a trainable group")
    tok = stage_tokenizer(config)
    ids = tok.convert_tokens_to_ids(list(tokens))
    if any(i is None or i == tok.unk_token_id for i in ids):
        raise ValueError(f"stage.trainable_token_rows {tokens}: not all are tokens of {config.tokenizer} ({ids})")
    mask = np.zeros(flatten(params)[key].shape[0], bool)
    mask[ids] = True
    _log0(f"  {key}: only rows {ids} ({', '.join(tokens)}) learn")
    return {key: mask}


def batch_to_device(arrays: dict, accum: int, mesh):
    """Host batch arrays (B, ...) -> global arrays (accum, B / accum, ...) sharded over the batch axes."""
    out = {}
    for k, x in arrays.items():
        x = x.reshape(accum, x.shape[0] // accum, *x.shape[1:])
        spec = P(None, BATCH_AXES, *([None] * (x.ndim - 2)))
        out[k] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x)
    return out


@dataclasses.dataclass
class TrainingSetup:
    """A stage's sharded train state and what compiles its step (shared by training and uhd-benchmark)."""

    state: TrainState
    state_sh: TrainState
    tx: Any
    split: Any
    schedules: dict
    labels: Any
    mesh: Any

    def step_fn(self, model, array_keys, dropout_seed: int | None):
        """The jitted train step: batch arrays (A, B, ...) sharded on the batch axes, state donated."""
        batch_sh = {k: NamedSharding(self.mesh, P(None, BATCH_AXES)) for k in array_keys}
        return jax.jit(make_train_step(model, self.tx, self.split, dropout_seed),
                       in_shardings=(self.state_sh, batch_sh),
                       out_shardings=(self.state_sh, NamedSharding(self.mesh, P())), donate_argnums=0)


def build_training(config, stage, cfg, mesh, rules, seed: int, total: int, init_dirs=(), name: str = "") -> TrainingSetup:
    """Initialise the model sharded (no unsharded copy), overlay `init_dirs`, and build the stage's optimizer and
    its sharded state. Call inside `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`."""
    rng = jax.random.PRNGKey(seed)
    boxed = jax.eval_shape(init_fn(cfg), rng)["params"]
    shapes = jax.tree_util.tree_map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x, boxed,
                                    is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))   # no constraint: abstract
    opt.check_rules(shapes, [tuple(r) for r in stage.trainable], dict(stage.lrs),
                    where=f"stages.{name}" if name else "stage")
    p_sh = logical_shardings(boxed, mesh, rules)
    params = jax.jit(lambda r: nn.meta.unbox(init_fn(cfg)(r)["params"]), out_shardings=p_sh)(rng)
    params = overlay_checkpoints(params, p_sh, list(init_dirs), cfg.llm.scan_layers,
                                 grow_vocab=bool(stage.get("grow_vocab", False)))
    labels = opt.group_labels(params, [tuple(r) for r in stage.trainable])
    t_labels = opt.trainable_labels(labels)
    counts = collections.Counter()
    jax.tree_util.tree_map(lambda p, g: counts.update({g: p.size}), params, labels)
    _log0("  parameters: " + ", ".join(f"{g} {n:,}" for g, n in sorted(counts.items())))
    tx, schedules = opt.make_optimizer(t_labels, dict(stage.lrs), total, warmup_ratio=stage.warmup_ratio,
                                       weight_decay=stage.weight_decay, grad_clip_norm=stage.get("grad_clip_norm"),
                                       row_masks=token_row_masks(config, stage, params, labels))
    split = lambda ps: opt.split_trainable(ps, labels)  # noqa: E731
    trainable_abs = split(jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))[0]
    o_sh = opt_state_shardings(jax.eval_shape(tx.init, trainable_abs), split(p_sh)[0], mesh)
    opt_state = jax.jit(tx.init, out_shardings=o_sh)(split(params)[0])
    replicated = NamedSharding(mesh, P())
    state_sh = TrainState(step=replicated, params=p_sh, opt_state=o_sh)
    state = TrainState(step=jax.device_put(jnp.int32(0), replicated), params=params, opt_state=opt_state)
    return TrainingSetup(state, state_sh, tx, split, schedules, labels, mesh)


# Sample counts by (file, size, mtime): the preflight and the stage itself both count, and a 665K-sample JSON
# takes seconds to parse.
_SAMPLE_COUNTS: dict = {}


def _sample_count(path: str) -> int:
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _SAMPLE_COUNTS:
        _SAMPLE_COUNTS[key] = len(read_samples(path))
    return _SAMPLE_COUNTS[key]


def source_problems(name: str, sources: list[Source]) -> tuple[int, list[str]]:
    """(samples in one epoch of the stage's data files, each weighted as the pipeline weighs it; what is wrong with
    them): a missing, unreadable or empty file, a missing image folder. An empty file is refused because it would
    train 0 steps and write an untrained `final/` that later stages load."""
    n, problems = 0, []
    for i, src in enumerate(sources):
        where = f"stage {name}: stages.{name}.sources[{i}]"
        fix = (f"put it there, or give the stage's data with --data {name}=FILE.json:IMAGE_FOLDER, or set "
               f"config.data_root (the config's relative paths are under it)")
        if not os.path.isfile(src.json):
            state = "is a directory, not a file" if os.path.isdir(src.json) else "not found"
            problems.append(f"{where}.json {src.json}: {state}; {fix}")
        else:
            try:
                count = _sample_count(src.json)
            except UserError as e:   # not UTF-8, not JSON, not a list: read_samples names the file and byte
                problems.append(f"{where}.json: {e}")
                count = None
            if count == 0:
                problems.append(f"{where}.json {src.json} holds no samples (an empty JSON list); nothing to train "
                                f"on: give stage {name} data, or leave it out (--stages)")
            if count:   # an epoch as the pipeline builds it: round(weight x size) samples of every source
                n += source_epoch_samples(count, src.weight)
        if src.image_folder and not os.path.isdir(src.image_folder):
            problems.append(f"{where}.image_folder {src.image_folder}: not a directory; {fix}")
    return n, problems


def count_samples(name: str, sources: list[Source]) -> int:
    """Samples in the stage's data files; the first problem with them (see `source_problems`) as a UserError."""
    n, problems = source_problems(name, sources)
    if problems:
        raise UserError(problems[0])
    return n


def tokenizer_problems(config) -> list[str]:
    """The config's tokenizer: a directory that transformers loads, with no more tokens than the model's vocabulary."""
    path = _resolve(config.tokenizer, config) if config.get("tokenizer") else ""
    if not path or not os.path.isdir(path):
        state = "is a file, not a directory" if os.path.isfile(path) else "not found"
        return [f"config.tokenizer {path or '(none)'}: {state}; put the LLM's transformers tokenizer directory there "
                f"(the HF download of the LLM holds it), or set --config.tokenizer (relative paths are under "
                f"config.data_root)"]
    try:
        tok = stage_tokenizer(config)
    except (OSError, ValueError) as e:   # a directory without tokenizer files, or with broken ones
        first = (str(e).splitlines() or [""])[0]
        return [f"config.tokenizer {path}: transformers cannot load it ({type(e).__name__}: {first}); point "
                f"config.tokenizer at the LLM's tokenizer directory"]
    vocab = int(config.model.llm.vocab_size)
    if len(tok) > vocab:
        return [f"config.tokenizer {path} has {len(tok)} tokens but model.llm.vocab_size is {vocab}: it is another "
                f"model's tokenizer, or set --config.model.llm.vocab_size"]
    return []


def init_problems(config, name: str, stage, workdir: str, produced=()) -> list[str]:
    """Each init checkpoint must be a finished uhd-jax checkpoint; `init_from_stage` must have finished in `workdir`
    or be among `produced` (stages this run trains before this one)."""
    problems = []
    for i, raw in enumerate(stage.get("init_checkpoints", ())):
        if not isinstance(raw, str) or not raw:
            problems.append(f"stage {name}: stages.{name}.init_checkpoints[{i}] {raw!r}: expected a checkpoint "
                            f"directory")
            continue
        path = _resolve(raw, config)
        if not os.path.isfile(os.path.join(path, "config.json")):
            state = "not found" if not os.path.exists(path) else "not a uhd-jax checkpoint (no config.json)"
            problems.append(f"stage {name}: stages.{name}.init_checkpoints[{i}] {path}: {state}; convert the "
                            f"PyTorch weights with `uhd-convert import ... --out {path}`, or fix "
                            f"the path (relative paths are under config.data_root)")
    prev = stage.get("init_from_stage")
    if prev and prev not in config.stages:
        problems.append(f"stage {name}: stages.{name}.init_from_stage {prev!r} is not a stage of this config "
                        f"({list(config.stage_order)})")
    elif prev and prev not in produced and not os.path.exists(os.path.join(workdir, prev, "final", "config.json")):
        problems.append(f"stage {name} starts from stage {prev} (stages.{name}.init_from_stage), which has not "
                        f"finished in {workdir}: run it first (--stages={prev},{name}) or set "
                        f"--config.stages.{name}.init_from_stage=''")
    return problems


def init_dirs(config, name: str, stage, workdir: str) -> list[str]:
    """The checkpoints the stage starts from, each checked to be a finished uhd-jax checkpoint."""
    problems = init_problems(config, name, stage, workdir)
    if problems:
        raise UserError(problems[0])
    inits = [_resolve(raw, config) for raw in stage.get("init_checkpoints", ())]
    if stage.get("init_from_stage"):
        inits.append(os.path.join(workdir, stage.init_from_stage, "final"))
    return inits


def jbu_source_problems(config, name: str, stage) -> tuple[int, list[str]]:
    """(images under the JBU stage's folders, what is wrong with them)."""
    from uhd_jax.data.jbu_images import list_images

    n, problems = 0, []
    for i, src in enumerate(stage.sources):
        folder = src.get("image_folder") if hasattr(src, "keys") else None
        if not isinstance(folder, str) or not folder:
            problems.append(f"stage {name}: stages.{name}.sources[{i}] {src!r}: the JBU stage reads image "
                            f"folders, {{'image_folder': DIR}}")
            continue
        path = _resolve(folder, config)
        try:
            n += len(list_images(path))
        except FileNotFoundError:
            problems.append(f"stage {name}: stages.{name}.sources[{i}].image_folder {path}: not found; put the "
                            f"images there, or give them with --data {name}=IMAGE_FOLDER, or set config.data_root")
        except ValueError as e:   # a folder without images
            problems.append(f"stage {name}: stages.{name}.sources[{i}].image_folder: {e}")
    if not stage.sources:
        problems.append(f"stage {name}: stages.{name}.sources is empty; give it an image folder "
                        f"(--data {name}=IMAGE_FOLDER)")
    if int(stage.get("grad_accum", 1)) != 1:
        problems.append(f"stage {name}: the JBU stage does not accumulate gradients (batch {stage.batch_size} is "
                        f"per step); set stages.{name}.grad_accum to 1")
    return n, problems


def rule_problems(config, name: str, stage) -> list[str]:
    """The stage's `trainable` rules and rates against its model's parameter paths (abstract: nothing allocated)."""
    try:
        cfg = vlm_config(stage_model(config, stage, lookup_separator=False))
    except (ValueError, TypeError) as e:   # a model override the towers cannot take
        return [f"stage {name}: the model (config.model with stages.{name}.model): {e}"]
    boxed = jax.eval_shape(init_fn(cfg), jax.random.PRNGKey(0))["params"]
    try:
        opt.check_rules(nn.meta.unbox(boxed), [tuple(r) for r in stage.trainable], dict(stage.lrs),
                        where=f"stages.{name}")
    except UserError as e:
        return [f"stage {name}: {e}"]
    return []


def stage_steps(stage, n_samples: int) -> int:
    """`num_steps`, else `num_epochs` passes over the stage's samples in global batches (the last one rounded up)."""
    return int(stage.get("num_steps") or math.ceil(stage.num_epochs * n_samples / stage.batch_size))


class PreflightError(UserError):
    """What the stages of a run lack, all of it, found before anything is built. `problems`: one line each."""

    def __init__(self, problems: list[str], config, stages):
        self.problems = problems
        if len(problems) == 1:
            super().__init__(problems[0])
            return
        root = config.get("data_root") or ""
        where = (f"config.data_root {root!r} ({os.path.abspath(root)})" if root else
                 f"the current directory ({os.getcwd()}), as config.data_root is empty")
        super().__init__(f"{len(problems)} problems with the inputs of stage(s) {', '.join(stages)}, found before "
                         f"anything was built (relative paths in the config are resolved against {where}):\n  "
                         + "\n  ".join(problems))


def preflight(config, workdir: str, stages) -> dict:
    """Check everything each stage of `stages` (in run order) reads - data files, image folders, the tokenizer, init
    checkpoints, an `init_from_stage` (finished in `workdir` or trained earlier in this run), the batch against the
    mesh, the step count, the template and the trainable rules - and raise one PreflightError listing every
    problem. A mistake in the last stage then costs seconds, not the hours of the stages before it. Stages already
    finished in `workdir` are not checked (they will not run). Returns {stage: samples (images for a JBU stage)}."""
    from uhd_jax.data.templates import get_template

    problems, produced, found, needs_tokenizer = [], set(), {}, False
    try:
        mesh = stage_mesh(config)
    except UserError as e:
        mesh, problems = None, [str(e)]
    for name in stages:
        stage = config.stages[name]
        if os.path.exists(os.path.join(workdir, name, "final", "config.json")):
            produced.add(name)
            continue
        jbu = stage.get("kind", "llava") == "jbu"
        here = []
        if jbu:
            n, here = jbu_source_problems(config, name, stage)
        else:
            needs_tokenizer = True
            try:
                get_template(stage.template)
            except ValueError as e:
                here.append(f"stage {name}: stages.{name}.template: {e}")
            try:
                n, more = source_problems(name, stage_sources(config, stage, name))
            except UserError as e:   # a malformed sources entry
                n, more = 0, [str(e)]
            here += more
        here += init_problems(config, name, stage, workdir, produced)
        batch_size, accum = int(stage.batch_size), int(stage.get("grad_accum", 1))
        if mesh is not None:
            try:
                check_batch(name, batch_size, accum, mesh, jax.process_count())
            except UserError as e:
                here.append(str(e))
        if not here and batch_size > 0 and stage_steps(stage, n) <= 0:
            here.append(f"stage {name}: {stage_steps(stage, n)} steps to train ({n} samples, num_epochs "
                        f"{stage.num_epochs}, num_steps {stage.get('num_steps')}); set stages.{name}.num_epochs or "
                        f"num_steps above 0, or leave the stage out (--stages)")
        if not jbu:
            here += rule_problems(config, name, stage)
            try:
                stage_length_buckets(stage, name)
            except UserError as e:
                here.append(f"stage {name}: {e}")
        problems += here
        produced.add(name)
        found[name] = n
    if needs_tokenizer:
        problems = tokenizer_problems(config) + problems
    if problems:
        raise PreflightError(problems, config, list(stages))
    return found


def stage_mesh(config):
    try:
        return make_mesh(dict(config.mesh))
    except ValueError as e:
        raise UserError(f"config.mesh {dict(config.mesh)}: {e}") from None


def check_batch(name: str, batch_size: int, accum: int, mesh, process_count: int) -> None:
    """Each micro-batch (batch_size / grad_accum samples) is split over the data-parallel devices and over the
    processes; say so before the first step, where JAX would stop with an IndivisibleError."""
    dp = math.prod(mesh.shape[a] for a in BATCH_AXES)
    unit = math.lcm(accum * dp, accum * process_count)
    if batch_size <= 0 or batch_size % unit:
        axes = " x ".join(f"{a}={mesh.shape[a]}" for a in BATCH_AXES)
        raise UserError(f"stage {name}: batch_size {batch_size} with grad_accum {accum} does not split over the "
                        f"mesh {dict(mesh.shape)}: each micro-batch of batch_size / grad_accum samples goes to the "
                        f"{dp} data-parallel devices ({axes}) and {process_count} process(es); set "
                        f"stages.{name}.batch_size to a multiple of {unit} (grad_accum {accum} x {unit // accum}), "
                        f"or change grad_accum or config.mesh")


def batch_plan(name: str, batch_size: int, accum: int, mesh, process_count: int) -> str:
    """How the stage's global batch is split, said once at its start: `batch_size` is the global batch, so lowering
    it to fit memory changes the recipe, where raising `grad_accum` keeps it."""
    dp = math.prod(mesh.shape[a] for a in BATCH_AXES)
    devices = f"{dp} data-parallel device(s)" + (f" (of {mesh.size})" if mesh.size != dp else "")
    mesh_axes = " ".join(f"{a}={n}" for a, n in mesh.shape.items())
    return (f"stage {name}: global batch {batch_size} = {accum} accumulation step(s) x {devices} x "
            f"{batch_size // accum // dp} per device (micro-batch {batch_size // accum}; mesh {mesh_axes}, "
            f"{process_count} process(es))")


def run_stage(config, name: str, workdir: str, *, stop_after: int | None = None,
              stop: StopRequests | None = None, checked: bool = False) -> StageResult:
    """Train one stage (resuming from its checkpoints) and write `<workdir>/<name>/final`. `stop`: the run's
    signal handling (run_stage installs its own when None). `checked`: `preflight` passed for this stage already
    (`run` checks every stage before the first)."""
    if stop is None:
        with StopRequests() as own:
            return run_stage(config, name, workdir, stop_after=stop_after, stop=own, checked=checked)
    stage = config.stages[name]
    if stage.get("kind", "llava") == "jbu":
        from uhd_jax.train.jbu_stage import run_jbu_stage  # the upsampler's own objective, no LLM

        return run_jbu_stage(config, name, workdir, stop_after=stop_after, stop=stop, checked=checked)
    stage_dir = os.path.join(workdir, name)
    final_dir = os.path.join(stage_dir, "final")
    if os.path.exists(os.path.join(final_dir, "config.json")):
        _log0(f"stage {name}: already finished ({final_dir})")
        return StageResult(name, final_dir, -1, read_metrics(os.path.join(stage_dir, "metrics.jsonl")), {})
    pi, pc = jax.process_index(), jax.process_count()
    # Every input the user names is checked before anything is built: a mistake costs seconds, not a model init.
    if not checked:
        preflight(config, workdir, [name])
    sources = stage_sources(config, stage, name)
    n_samples = count_samples(name, sources)
    inits = init_dirs(config, name, stage, workdir)
    cfg = model_for_stage(config, stage)
    model = VLM(cfg)
    mesh = stage_mesh(config)
    rules = rules_from_config(config.get("axis_rules"))
    accum = int(stage.get("grad_accum", 1))
    check_batch(name, int(stage.batch_size), accum, mesh, pc)
    total = stage_steps(stage, n_samples)
    local_batch = stage.batch_size // pc
    shape = BatchShape(local_batch, stage.max_length, config.data.max_images * cfg.views_per_image,
                       cfg.vision.image_size, packed_layout(config, cfg, stage))
    seed = int(config.seed) + list(config.stage_order).index(name)
    _log0(f"{batch_plan(name, int(stage.batch_size), accum, mesh, pc)}; {n_samples} samples, {total} steps "
          f"({total * stage.batch_size / n_samples:.2f} epochs), template {stage.template}")

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        setup = build_training(config, stage, cfg, mesh, rules, seed, total, inits, name=name)
        state, state_sh, schedules = setup.state, setup.state_sh, setup.schedules

        ckpt = TrainCheckpointer(os.path.join(stage_dir, "checkpoints"), save_every=int(stage.save_every),
                                 keep=int(stage.get("keep", 2)))
        iterator = make_iterator(sources, preparer_factory(config, stage, cfg), shape, seed=seed,
                                 num_workers=int(config.data.num_workers), process_index=pi, process_count=pc,
                                 **stage_length_buckets(stage, name))
        try:
            state, start = ckpt.resume(state, state_sh, iterator)
            if start:
                _log0(f"  resumed from step {start} ({ckpt.manager.directory})")

            step_fn = setup.step_fn(model, shape.array_keys, seed if cfg.stochastic_training else None)
            result = _loop(config, stage, name, stage_dir, state, step_fn, iterator, ckpt, mesh, accum, start, total,
                           stop_after, schedules, stop)
            ckpt.wait()
        finally:
            ckpt.close()
            iterator.close()   # joins the data workers now, not whenever the iterator is garbage-collected
        if result is None:  # stopped early on request (tests, preemption drills)
            return StageResult(name, "", stop_after, read_metrics(os.path.join(stage_dir, "metrics.jsonl")), {})
        state, skipped = result
        compilations = step_fn._cache_size()
        _log0(f"  the train step compiled {compilations} time(s)")
        meta = final_meta(config, stage, name, total)
        save_params(final_dir, state.params, meta)
    history = read_metrics(os.path.join(stage_dir, "metrics.jsonl"))
    if pi == 0 and history:
        plot_curves(history, os.path.join(stage_dir, "curves.png"), title=f"{config.get('family', '')} {name}")
    return StageResult(name, final_dir, total, history, skip_kinds(skipped), compilations)


def stage_length_buckets(stage, name: str = "") -> dict:
    """`make_iterator`'s length bucketing from `stage.length_buckets` (token lengths below max_length; () pads every
    row to max_length) and `stage.length_window` (batches sorted together: wider groups tighter, holds more
    prepared samples in memory and re-prepares more on resume)."""
    where = f"stages.{name}" if name else "stage"
    buckets = tuple(stage.get("length_buckets", ()) or ())
    window = stage.get("length_window", 8)
    bucket_lengths(int(stage.max_length), buckets, where=f"{where}.length_buckets")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise UserError(f"{where}.length_window {window!r}: expected a number of batches >= 1")
    return {"length_buckets": buckets, "length_window": window}


def same_length_everywhere(arrays: dict) -> dict:
    """Every process pads its batch to the longest bucket any of them drew: one global array has one shape (a
    small all-gather per step, only with length buckets)."""
    if jax.process_count() == 1:
        return arrays
    from jax.experimental import multihost_utils

    lengths = multihost_utils.process_allgather(np.int32(arrays["input_ids"].shape[1]))
    return pad_batch(arrays, int(np.max(lengths)))


def final_meta(config, stage, name: str, steps: int) -> dict:
    """config.json of a trained stage's `final/`: what generation and evaluation need from `--checkpoint` alone.
    The tokenizer is recorded as an absolute path: a relative one meant "under data_root, from wherever training
    ran", neither of which is recorded."""
    return {"model": stage_model(config, stage), "stage": name, "steps": steps, "family": config.get("family"),
            "variant": config.get("variant"), "tokenizer": os.path.abspath(_resolve(config.tokenizer, config))}


def schedule_tables(schedules: dict, total: int) -> dict:
    """Every step's learning rate per group, computed once on the host's side of the stage. Evaluating a schedule
    per step dispatched a small computation that waited for the step just queued, so the host could not prepare the
    next batch while the device trained on this one."""
    steps = jnp.arange(max(total, 1), dtype=jnp.int32)
    return {g: np.asarray(jax.device_get(jax.jit(jax.vmap(s))(steps))) for g, s in schedules.items()}


def _loop(config, stage, name, stage_dir, state, step_fn, iterator, ckpt, mesh, accum, start, total, stop_after,
          schedules, stop=None):
    from tqdm import tqdm

    # Logs are cut back to the restored step: the steps after it run again and must not appear twice.
    log = MetricsLog(stage_dir, enabled=jax.process_index() == 0, resume_step=start)
    skipped_path = os.path.join(stage_dir, f"skipped.process{jax.process_index()}.jsonl")
    skipped = [(r["id"], r["reason"]) for r in truncate_jsonl(skipped_path, start)]
    restored = ckpt.restored_meta if start else {}
    truncated, epoch, bad_streak = int(restored.get("truncated", 0)), None, 0
    max_bad = int(stage.get("max_bad_steps", 5))
    bucketed = bool(stage.get("length_buckets"))
    log_every = int(stage.get("log_every", 1))
    bar = tqdm(total=total, initial=start, desc=name, disable=jax.process_index() != 0, dynamic_ncols=True)
    pending = None
    # A stage resumed at its last step trains nothing: its final loss comes from the checkpoint.
    last_loss = [float(restored.get("loss", float("nan")))]
    last_time = time.perf_counter()
    window = {"tokens": 0, "images": 0}
    rates = schedule_tables(schedules, total)

    def finish(pending_item):
        nonlocal bad_streak, last_time
        step, metrics, ids, pad = pending_item
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not m.pop("finite"):
            bad_streak += 1
            log.write(step, {"event": "non-finite loss, update skipped", "batch_ids": ids, "loss": m["loss"]})
            _log0(f"  step {step}: non-finite loss ({m['loss']}), update skipped; batch {ids[:8]}")
            if bad_streak >= max_bad:
                ckpt.wait()
                raise TrainingDiverged(
                    f"stage {name}: {bad_streak} consecutive non-finite steps (last at step {step}); the last good "
                    f"checkpoint is step {ckpt.latest_step()} in {ckpt.manager.directory}")
            return
        bad_streak = 0
        last_loss[0] = m["loss"]
        now = time.perf_counter()
        dt, last_time = now - last_time, now
        lr = {f"lr_{g}": float(t[step - 1]) for g, t in rates.items()}  # the rate this update used
        row = {**m, **lr, "tokens_per_s": window["tokens"] / max(dt, 1e-9),
               "images_per_s": window["images"] / max(dt, 1e-9), "skipped_total": len(skipped),
               "pad_fraction": pad}
        window.update(tokens=0, images=0)
        if step % log_every == 0 or step == total:
            log.write(step, row)
        bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['accuracy']:.2f}")

    def meta(step):
        return {"step": step, "skipped": len(skipped), "truncated": truncated, "loss": last_loss[0]}

    saved = [start]

    def preempt(done: int):
        """Checkpoint the last completed step (unless it is saved already) and stop."""
        if pending is not None:
            finish(pending)
        if done > saved[0]:
            ckpt.save(done, state, iterator.get_state(), meta(done), force=True)
        ckpt.wait()
        where = f"checkpoint of step {done} in {ckpt.manager.directory}" if done else "no step trained, nothing saved"
        return Preempted(f"stage {name}: stopped by {signal.Signals(stop.signum).name} after step {done} "
                         f"({where}); rerun the same command to resume", stop.signum)

    try:
        for step in range(start + 1, total + 1):
            if stop is not None and stop.reached(step - 1):
                raise preempt(step - 1)
            try:
                batch = next(iterator)
            except DataExhausted as e:
                raise DataExhausted(f"stage {name}: {e}") from None
            except Exception:
                # A preemption signal that reached the data workers too (the whole process group or cgroup) ends
                # them mid-batch; the step before is still whole and is what gets saved.
                if stop is not None and stop.signum is not None:
                    raise preempt(step - 1) from None
                raise
            meta_b = batch["meta"]
            if meta_b["skipped"]:
                skipped += meta_b["skipped"]
                with open(skipped_path, "a") as f:
                    for sid, reason in meta_b["skipped"]:
                        f.write(json.dumps({"step": step, "id": sid, "reason": reason}) + "\n")
            truncated += meta_b["truncated"]
            if epoch is not None and meta_b["epoch"] > epoch:
                _log0(f"  epoch {epoch} done: {len(skipped)} samples skipped so far "
                      f"{skip_kinds(skipped)}, {truncated} truncated")
            epoch = meta_b["epoch"]
            arrays = same_length_everywhere(batch["arrays"]) if bucketed else batch["arrays"]
            window["tokens"] += int(arrays["token_valid"].sum()) * jax.process_count()
            window["images"] += int(arrays["image_valid"].sum()) * jax.process_count()
            state, metrics = step_fn(state, batch_to_device(arrays, accum, mesh))
            if pending is not None:
                finish(pending)
            # This process's share of padding in the step (length buckets cut it; see data/buckets.py).
            pending = (step, metrics, meta_b["ids"], 1.0 - float(arrays["token_valid"].mean()))
            if step == total:   # its loss goes into the last checkpoint
                finish(pending)
                pending = None
            bar.update(1)
            if ckpt.save(step, state, iterator.get_state(), meta(step), force=(step == total)):
                saved[0] = step
            if stop_after is not None and step >= stop_after:
                if pending is not None:
                    finish(pending)
                return None
        if pending is not None:
            finish(pending)
    finally:
        bar.close()
        log.close()
    _log0(f"stage {name} done: {total} steps; skipped {len(skipped)} samples {skip_kinds(skipped)}, "
          f"{truncated} truncated")
    print(f"[process {jax.process_index()}] stage {name} step {total} loss {last_loss[0]:.6f}", flush=True)
    return state, skipped


def run(config, workdir: str, stages=None) -> list[StageResult]:
    """The stages in order, every one's inputs checked first (`preflight`). One StopRequests for all of them: a
    signal that lands while one stage writes its `final/` stops the run before the next stage starts."""
    names = run_order(config, stages)
    preflight(config, workdir, names)
    results = []
    with StopRequests() as stop:
        for name in names:
            if stop.signum is not None:
                raise Preempted(f"stopped by {signal.Signals(stop.signum).name} before stage {name}; rerun the same "
                                f"command to continue", stop.signum)
            results.append(run_stage(config, name, workdir, stop=stop, checked=True))
    return results
