"""The `jbu` stage of LLaVA-UHD v2 (spec uhd.md §4.4): pretrain the JBU inverse feature pyramid with FeatUp's
multi-view reconstruction objective (`uhd_jax.models.projectors.vdim`) against the frozen ViT, on an image folder.

  uhd-train --config configs/uhd_v2.py:7b --workdir runs/uhd_v2-7b --stages=jbu

One jitted step: ViT features of the image and of `n_jitters` jittered views (no gradient), the JBU 2x/4x maps, the
downsamplers, scale nets and CRF; torch-semantics NAdam (lr 1e-3) with the global gradient norm clipped to 1e-4 for
the first 10 updates. Random draws (jitters, projections, CRF pixels, dropout) come from (seed, step): a resumed run
continues exactly. `<workdir>/jbu/final` holds `projector/upsampler/*` (what LLaVA's projector loads) and
`vdim_objective/*` (downsamplers and scale nets, dropped when a LLaVA stage loads the checkpoint), plus the frozen
`vision/*` it was trained against when `stage.save_featurizer` (demos that start from a random ViT).
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from uhd_jax.data.jbu_images import JBUImagePreparer, folder_images, jbu_iterator
from uhd_jax.data.pipeline import skip_kinds
from uhd_jax.models.projectors.vdim import (CRFSpec, JitterSpec, VDIMObjective, VDIMSpec, apply_jitter, channel_norm,
                                            random_projection, sample_jitter)
from uhd_jax.models.vit import VisionTransformer
from uhd_jax.parallel.sharding import BATCH_AXES, logical_shardings, rules_from_config
from uhd_jax.train import optimizer as opt
from uhd_jax.train.checkpoints import TrainCheckpointer, save_params
from uhd_jax.train.metrics_log import MetricsLog, plot_curves, read_metrics
from uhd_jax.train.state import TrainState, opt_state_shardings
from uhd_jax.train.step import apply_if_finite

TRAINED = ("projector", "vdim_objective")


def vdim_spec(stage) -> VDIMSpec:
    return VDIMSpec(n_jitters=int(stage.get("n_jitters", 2)),
                    jitter=JitterSpec(max_pad=int(stage.get("max_pad", 30)),
                                      max_zoom=float(stage.get("max_zoom", 2.0))),
                    proj_dim=int(stage.get("proj_dim", 30)),
                    crf=CRFSpec(weight=float(stage.get("crf_weight", 0.001)),
                                samples=int(stage.get("crf_samples", 1000))))


class JBUTraining:
    """The stage's model: frozen ViT (`vision`), the trained upsampler (`projector/upsampler`) and the objective's
    own modules (`vdim_objective`); `loss(params, images, key, deterministic)` is the whole objective."""

    def __init__(self, vision_cfg, spec: VDIMSpec, image_size: int, use_channel_norm: bool = True):
        if image_size % vision_cfg.patch_size:
            raise ValueError(f"JBU stage image_size {image_size} is not a multiple of the patch size "
                             f"{vision_cfg.patch_size}")
        self.vision = VisionTransformer(vision_cfg)
        self.grid = image_size // vision_cfg.patch_size
        self.size = image_size
        self.spec = spec
        self.dim = vision_cfg.hidden_size
        self.use_channel_norm = use_channel_norm
        self.objective = VDIMObjective(vision_cfg.patch_size, self.grid, spec)

    def init(self, rng):
        """Boxed parameters {'vision', 'projector': {'upsampler'}, 'vdim_objective'}."""
        k_vis, k_obj = jax.random.split(rng)
        images = jnp.zeros((1, self.size, self.size, 3), jnp.float32)
        vision = self.vision.init(k_vis, images)["params"]
        lr = jnp.zeros((1, self.grid, self.grid, self.dim), jnp.float32)
        obj = self.objective.init(k_obj, images, lr, self._views(jax.random.PRNGKey(0), None, images, lr))["params"]
        rest = {k: v for k, v in obj.items() if k != "upsampler"}
        return {"vision": vision, "projector": {"upsampler": obj["upsampler"]}, "vdim_objective": rest}

    def featurize(self, vision_params, images):
        """Frozen ViT features (B, g, g, C) at its select layer (FeatUp's featurizer + ChannelNorm)."""
        feats = self.vision.apply({"params": vision_params}, images)
        b = images.shape[0]
        feats = feats.reshape(b, self.grid, self.grid, -1)
        feats = channel_norm(feats) if self.use_channel_norm else feats.astype(jnp.float32)
        return jax.lax.stop_gradient(feats)

    def _views(self, key, vision_params, images, lr):
        b, views = images.shape[0], []
        for i in range(self.spec.n_jitters):
            k_jit, k_proj, k_row, k_col = jax.random.split(jax.random.fold_in(key, i), 4)
            params = sample_jitter(k_jit, b, self.size, self.spec.jitter)
            lr_jit = lr if vision_params is None else self.featurize(
                vision_params, apply_jitter(images, params, self.spec.jitter))
            n = self.spec.crf.samples
            coords = jnp.stack([jax.random.randint(k_row, (n,), 0, self.size),
                                jax.random.randint(k_col, (n,), 0, self.size)], axis=-1)
            views.append({"params": params, "lr_feats": lr_jit, "crf_coords": coords,
                          "proj": random_projection(k_proj, b, self.dim, self.spec.proj_dim)})
        return views

    def loss(self, params, images, key, deterministic: bool = False):
        k_views, k_drop = jax.random.split(key)
        lr = self.featurize(params["vision"], images)
        views = self._views(k_views, params["vision"], images, lr)
        obj = {"upsampler": params["projector"]["upsampler"], **params["vdim_objective"]}
        return self.objective.apply({"params": obj}, images, lr, views, deterministic=deterministic,
                                    rngs=None if deterministic else {"dropout": k_drop})


def make_jbu_step(training: JBUTraining, tx, seed: int):
    def split(params):
        return {k: params[k] for k in TRAINED}, params["vision"]

    def train_step(state: TrainState, images):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
        trainable, vision = split(state.params)
        loss_fn = lambda t: training.loss({**t, "vision": vision}, images, key)  # noqa: E731
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        new_state, grad_norm, finite = apply_if_finite(state, tx, grads, trainable, loss,
                                                       lambda t: {**t, "vision": vision})
        return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite, **parts}

    return train_step


def probe_images(paths, preparer: JBUImagePreparer, count: int) -> np.ndarray:
    """The first `count` images the pipeline would accept (sorted order): a fixed batch to report the objective on."""
    out = []
    for i, path in enumerate(paths):
        ex = preparer((i, path))
        if "skip" not in ex:
            out.append(ex["image"])
        if len(out) == count:
            break
    return np.stack(out)


def run_jbu_stage(config, name: str, workdir: str, *, stop_after: int | None = None, stop=None, checked: bool = False):
    import signal

    from tqdm import tqdm

    from uhd_jax.cli_errors import UserError
    from uhd_jax.train.trainer import (Preempted, StageResult, _log0, _resolve, batch_plan, check_batch, init_dirs,
                                       model_for_stage, overlay_checkpoints, preflight, stage_mesh, stage_steps)

    stage = config.stages[name]
    stage_dir = os.path.join(workdir, name)
    final_dir = os.path.join(stage_dir, "final")
    if os.path.exists(os.path.join(final_dir, "config.json")):
        _log0(f"stage {name}: already finished ({final_dir})")
        return StageResult(name, final_dir, -1, read_metrics(os.path.join(stage_dir, "metrics.jsonl")), {})
    if not checked:
        preflight(config, workdir, [name])
    cfg = model_for_stage(config, stage)
    size = int(stage.get("image_size") or cfg.vision.image_size)
    training = JBUTraining(cfg.vision, vdim_spec(stage), size, bool(stage.get("channel_norm", True)))
    mesh = stage_mesh(config)
    rules = rules_from_config(config.get("axis_rules"))
    try:
        paths = folder_images([_resolve(s["image_folder"], config) for s in stage.sources])
    except (FileNotFoundError, ValueError) as e:   # no folder, or no image in it
        raise UserError(f"stage {name}: {e}") from None
    inits = init_dirs(config, name, stage, workdir)
    preparer = JBUImagePreparer(size, config.data.max_image_pixels, config.data.min_image_area)
    pi, pc = jax.process_index(), jax.process_count()
    check_batch(name, int(stage.batch_size), 1, mesh, pc)
    seed = int(config.seed) + list(config.stage_order).index(name)
    total = stage_steps(stage, len(paths))
    iterator = jbu_iterator(paths, preparer, stage.batch_size // pc, seed=seed,
                            num_workers=int(config.data.num_workers), process_index=pi, process_count=pc)
    _log0(f"{batch_plan(name, int(stage.batch_size), 1, mesh, pc)}; {len(paths)} images at {size}x{size}, "
          f"{total} steps, {training.spec.n_jitters} jitters")

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        rng = jax.random.PRNGKey(seed)
        boxed = jax.eval_shape(training.init, rng)
        p_sh = logical_shardings(boxed, mesh, rules)
        params = jax.jit(lambda r: nn.meta.unbox(training.init(r)), out_shardings=p_sh)(rng)
        params = overlay_checkpoints(params, p_sh, inits, cfg.llm.scan_layers, partial_model=True)
        counts = {k: sum(x.size for x in jax.tree_util.tree_leaves(params[k])) for k in params}
        _log0("  parameters: " + ", ".join(f"{k} {n:,}" + (" (frozen)" if k == "vision" else "")
                                           for k, n in counts.items()))

        tx = optax.chain(opt.clip_first_steps(float(stage.get("warm_clip_norm", 1e-4)),
                                              int(stage.get("warm_clip_steps", 10))),
                         opt.torch_nadam(float(stage.lr)))
        trainable = {k: params[k] for k in TRAINED}
        t_sh = {k: p_sh[k] for k in TRAINED}
        o_sh = opt_state_shardings(jax.eval_shape(tx.init, trainable), t_sh, mesh)
        replicated = NamedSharding(mesh, P())
        state_sh = TrainState(step=replicated, params=p_sh, opt_state=o_sh)
        state = TrainState(step=jax.device_put(jnp.int32(0), replicated), params=params,
                           opt_state=jax.jit(tx.init, out_shardings=o_sh)(trainable))
        img_sh = NamedSharding(mesh, P(BATCH_AXES))
        step_fn = jax.jit(make_jbu_step(training, tx, seed), in_shardings=(state_sh, img_sh),
                          out_shardings=(state_sh, replicated), donate_argnums=0)
        probe = jax.jit(lambda p, x: training.loss(p, x, jax.random.PRNGKey(seed), deterministic=True)[0])
        probe_batch = probe_images(paths, preparer, min(stage.batch_size, 8))
        probe_before = float(probe(state.params, probe_batch))

        ckpt = TrainCheckpointer(os.path.join(stage_dir, "checkpoints"), save_every=int(stage.save_every),
                                 keep=int(stage.get("keep", 2)))
        state, start = ckpt.resume(state, state_sh, iterator)
        if start:
            _log0(f"  resumed from step {start} ({ckpt.manager.directory})")

        log = MetricsLog(stage_dir, enabled=pi == 0, resume_step=start)
        skipped, bad_streak, saved = [], 0, start
        bar = tqdm(total=total, initial=start, desc=name, disable=pi != 0, dynamic_ncols=True)

        def preempt(done):
            if done > saved:
                ckpt.save(done, state, iterator.get_state(), {"step": done, "skipped": len(skipped)}, force=True)
            ckpt.wait()
            return Preempted(f"stage {name}: stopped by {signal.Signals(stop.signum).name} after step {done} "
                             f"(checkpoints in {ckpt.manager.directory}); rerun the same command to resume",
                             stop.signum)

        try:
            for step in range(start + 1, total + 1):
                if stop is not None and stop.reached(step - 1):
                    raise preempt(step - 1)
                try:
                    batch = next(iterator)
                except Exception:
                    if stop is not None and stop.signum is not None:   # the signal ended the workers too
                        raise preempt(step - 1) from None
                    raise
                skipped += batch["meta"]["skipped"]
                images = jax.make_array_from_process_local_data(img_sh, batch["arrays"]["images"])
                state, metrics = step_fn(state, images)
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not m.pop("finite"):
                    bad_streak += 1
                    log.write(step, {"event": "non-finite loss, update skipped", "loss": m["loss"]})
                    if bad_streak >= int(stage.get("max_bad_steps", 5)):
                        from uhd_jax.train.trainer import TrainingDiverged

                        ckpt.wait()
                        raise TrainingDiverged(f"stage {name}: {bad_streak} consecutive non-finite steps; the last "
                                               f"good checkpoint is step {ckpt.latest_step()}")
                else:
                    bad_streak = 0
                    log.write(step, {**m, "skipped_total": len(skipped)})
                    bar.set_postfix(loss=f"{m['loss']:.4f}")
                bar.update(1)
                if ckpt.save(step, state, iterator.get_state(), {"step": step, "skipped": len(skipped)},
                             force=(step == total)):
                    saved = step
                if stop_after is not None and step >= stop_after:
                    ckpt.wait()
                    return StageResult(name, "", stop_after, read_metrics(os.path.join(stage_dir, "metrics.jsonl")),
                                       {})
            ckpt.wait()
        finally:
            bar.close()
            log.close()
            ckpt.close()
            iterator.close()
        probe_after = float(probe(state.params, probe_batch))
        _log0(f"stage {name} done: {total} steps; objective on a fixed batch {probe_before:.4f} -> {probe_after:.4f}; "
              f"skipped {len(skipped)} images {skip_kinds(skipped)}")
        compilations = step_fn._cache_size()
        keep = TRAINED + (("vision",) if stage.get("save_featurizer") else ())
        meta = {"model": config.model.to_dict(), "stage": name, "steps": total, "family": config.get("family"),
                "variant": config.get("variant"), "kind": "jbu", "probe_objective": [probe_before, probe_after]}
        save_params(final_dir, {k: state.params[k] for k in keep}, meta)
    history = read_metrics(os.path.join(stage_dir, "metrics.jsonl"))
    if pi == 0 and history:
        plot_curves(history, os.path.join(stage_dir, "curves.png"), keys=("loss", "rec_4x", "rec_2x"),
                    title=f"{config.get('family', '')} {name}")
    return StageResult(name, final_dir, total, history, skip_kinds(skipped), compilations)
