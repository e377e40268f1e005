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
from uhd_jax.data.slicing import SlicingOptions
from uhd_jax.data.uhd_images import PackedLayout, layout_for_model
from uhd_jax.data.dataset import load_tokenizer, read_samples
from uhd_jax.data.pipeline import DataExhausted, PreparerFactory, Source, make_iterator, skip_kinds
from uhd_jax.models.config import vlm_config
from uhd_jax.models.vlm import VLM, init_fn
from uhd_jax.parallel.mesh import make_mesh
from uhd_jax.parallel.sharding import BATCH_AXES, logical_shardings, rules_from_config
from uhd_jax.train import optimizer as opt
from uhd_jax.train.checkpoints import TrainCheckpointer, load_meta, load_params, save_params
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


def stage_model(config, stage) -> dict:
    """`config.model` with the stage's overrides: `stage.vision_trainable`, and `stage.model` (merged one level deep,
    e.g. SliME's runs 1a-1c: `model=dict(slime=dict(views='global', expert=0))`). A SliME separator_id of -1 is
    looked up in the tokenizer as the original does (`tokenizer(',').input_ids[-1]`)."""
    model = config.model.to_dict()
    if "vision_trainable" in stage:
        model["vision_trainable"] = bool(stage.vision_trainable)
    for key, value in dict(stage.get("model") or {}).items():
        value = value.to_dict() if hasattr(value, "to_dict") else value
        model[key] = {**model[key], **value} if isinstance(value, dict) and isinstance(model.get(key), dict) else value
    slime = model.get("slime")
    if slime and int(slime.get("separator_id", 0)) < 0:
        tok = stage_tokenizer(config)
        model["slime"] = dict(slime, separator_id=int(tok(",", add_special_tokens=False)["input_ids"][-1]))
    return model


def model_for_stage(config, stage):
    return vlm_config(stage_model(config, stage))


def _resolve(path: str, config) -> str:
    root = config.get("data_root") or ""
    return path if os.path.isabs(path) or not root else os.path.join(root, path)


def stage_sources(config, stage) -> list[Source]:
    return [Source(_resolve(s["json"], config), _resolve(s["image_folder"], config), float(s.get("weight", 1.0)))
            for s in stage.sources]


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
    """A stage's sharded train state and what compiles its step (shared by training and launch/benchmark.py)."""

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


def count_samples(name: str, sources: list[Source]) -> int:
    """Samples in the stage's data files, each file checked: a missing or empty file is the user's to fix, and an
    empty one would otherwise train 0 steps and write an untrained `final/` that later stages load."""
    n = 0
    for i, src in enumerate(sources):
        where = f"stage {name}: sources[{i}]"
        if not os.path.isfile(src.json):
            raise UserError(f"{where}.json {src.json}: not found; fix stages.{name}.sources or config.data_root "
                            f"(relative paths are resolved against it)")
        if src.image_folder and not os.path.isdir(src.image_folder):
            raise UserError(f"{where}.image_folder {src.image_folder}: not a directory; fix stages.{name}.sources "
                            f"or config.data_root")
        count = len(read_samples(src.json))
        if not count:
            raise UserError(f"{where}.json {src.json} holds no samples (an empty JSON list); nothing to train on: "
                            f"give stage {name} data, or leave it out (--stages)")
        n += count
    return n


def check_tokenizer(config) -> None:
    path = _resolve(config.tokenizer, config)
    if not path or not os.path.isdir(path):
        raise UserError(f"tokenizer {path or '(none)'}: not a directory; set config.tokenizer to a local "
                        f"transformers tokenizer directory (relative paths are resolved against config.data_root)")


def init_dirs(config, name: str, stage, workdir: str) -> list[str]:
    """The checkpoints the stage starts from, each checked to be a finished uhd-jax checkpoint."""
    inits = []
    for i, raw in enumerate(stage.get("init_checkpoints", ())):
        path = _resolve(raw, config)
        if not os.path.isfile(os.path.join(path, "config.json")):
            state = "not found" if not os.path.exists(path) else "not a uhd-jax checkpoint (no config.json)"
            raise UserError(f"stage {name}: init checkpoint {path} (stages.{name}.init_checkpoints[{i}]): {state}; "
                            f"convert the PyTorch weights with `python -m tools.convert_torch import ... --out "
                            f"{path}`, or fix the path")
        inits.append(path)
    if stage.get("init_from_stage"):
        prev = os.path.join(workdir, stage.init_from_stage, "final")
        if not os.path.exists(os.path.join(prev, "config.json")):
            raise UserError(f"stage {name} starts from stage {stage.init_from_stage}, which has not finished in "
                            f"{workdir}: run it first (--stages={stage.init_from_stage}) or set "
                            f"--config.stages.{name}.init_from_stage=''")
        inits.append(prev)
    return inits


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


def run_stage(config, name: str, workdir: str, *, stop_after: int | None = None,
              stop: StopRequests | None = None) -> StageResult:
    """Train one stage (resuming from its checkpoints) and write `<workdir>/<name>/final`. `stop`: the run's
    signal handling (run_stage installs its own when None)."""
    if stop is None:
        with StopRequests() as own:
            return run_stage(config, name, workdir, stop_after=stop_after, stop=own)
    stage = config.stages[name]
    if stage.get("kind", "llava") == "jbu":
        from uhd_jax.train.jbu_stage import run_jbu_stage  # the upsampler's own objective, no LLM

        return run_jbu_stage(config, name, workdir, stop_after=stop_after, stop=stop)
    stage_dir = os.path.join(workdir, name)
    final_dir = os.path.join(stage_dir, "final")
    if os.path.exists(os.path.join(final_dir, "config.json")):
        _log0(f"stage {name}: already finished ({final_dir})")
        return StageResult(name, final_dir, -1, read_metrics(os.path.join(stage_dir, "metrics.jsonl")), {})
    pi, pc = jax.process_index(), jax.process_count()
    # Every input the user names is checked before anything is built: a mistake costs seconds, not a model init.
    sources = stage_sources(config, stage)
    n_samples = count_samples(name, sources)
    check_tokenizer(config)
    inits = init_dirs(config, name, stage, workdir)
    cfg = model_for_stage(config, stage)
    model = VLM(cfg)
    mesh = stage_mesh(config)
    rules = rules_from_config(config.get("axis_rules"))
    accum = int(stage.get("grad_accum", 1))
    check_batch(name, int(stage.batch_size), accum, mesh, pc)
    total = int(stage.get("num_steps") or math.ceil(stage.num_epochs * n_samples / stage.batch_size))
    if total <= 0:
        raise UserError(f"stage {name}: {total} steps to train ({n_samples} samples, num_epochs "
                        f"{stage.num_epochs}, num_steps {stage.get('num_steps')}); set stages.{name}.num_epochs or "
                        f"num_steps above 0, or leave the stage out (--stages)")
    local_batch = stage.batch_size // pc
    shape = BatchShape(local_batch, stage.max_length, config.data.max_images * cfg.views_per_image,
                       cfg.vision.image_size, packed_layout(config, cfg, stage))
    seed = int(config.seed) + list(config.stage_order).index(name)
    _log0(f"stage {name}: {n_samples} samples, {total} steps of {stage.batch_size} ({accum} x "
          f"{stage.batch_size // accum}), template {stage.template}, mesh {dict(mesh.shape)}")

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        setup = build_training(config, stage, cfg, mesh, rules, seed, total, inits, name=name)
        state, state_sh, schedules = setup.state, setup.state_sh, setup.schedules

        ckpt = TrainCheckpointer(os.path.join(stage_dir, "checkpoints"), save_every=int(stage.save_every),
                                 keep=int(stage.get("keep", 2)))
        iterator = make_iterator(sources, preparer_factory(config, stage, cfg), shape, seed=seed,
                                 num_workers=int(config.data.num_workers), process_index=pi, process_count=pc)
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
        meta = {"model": stage_model(config, stage), "stage": name, "steps": total, "family": config.get("family"),
                "tokenizer": _resolve(config.tokenizer, config)}
        save_params(final_dir, state.params, meta)
    history = read_metrics(os.path.join(stage_dir, "metrics.jsonl"))
    if pi == 0 and history:
        plot_curves(history, os.path.join(stage_dir, "curves.png"), title=f"{config.get('family', '')} {name}")
    return StageResult(name, final_dir, total, history, skip_kinds(skipped), compilations)


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
    log_every = int(stage.get("log_every", 1))
    bar = tqdm(total=total, initial=start, desc=name, disable=jax.process_index() != 0, dynamic_ncols=True)
    pending = None
    # A stage resumed at its last step trains nothing: its final loss comes from the checkpoint.
    last_loss = [float(restored.get("loss", float("nan")))]
    last_time = time.perf_counter()
    window = {"tokens": 0, "images": 0}

    def finish(pending_item):
        nonlocal bad_streak, last_time
        step, metrics, ids = pending_item
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
        lr = {f"lr_{g}": float(s(int(step) - 1)) for g, s in schedules.items()}  # the rate this update used
        row = {**m, **lr, "tokens_per_s": window["tokens"] / max(dt, 1e-9),
               "images_per_s": window["images"] / max(dt, 1e-9), "skipped_total": len(skipped)}
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
            arrays = batch["arrays"]
            window["tokens"] += int(arrays["token_valid"].sum()) * jax.process_count()
            window["images"] += int(arrays["image_valid"].sum()) * jax.process_count()
            state, metrics = step_fn(state, batch_to_device(arrays, accum, mesh))
            if pending is not None:
                finish(pending)
            pending = (step, metrics, meta_b["ids"])
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
    """The stages in order. One StopRequests for all of them: a signal that lands while one stage writes its
    `final/` stops the run before the next stage starts."""
    results = []
    with StopRequests() as stop:
        for name in stages or config.stage_order:
            if stop.signum is not None:
                raise Preempted(f"stopped by {signal.Signals(stop.signum).name} before stage {name}; rerun the same "
                                f"command to continue", stop.signum)
            results.append(run_stage(config, name, workdir, stop=stop))
    return results
