"""Device memory of a LLaVA-style stage's real train step (`make_train_step`, state donated, sharded as the trainer
shards it), from XLA's buffer assignment with abstract state and batch: whether a LoRA SFT step fits a device is
answered on a CPU (see `uhd_jax.perf.memory` for what the numbers mean).

  python -m uhd_jax.perf.train_memory --config configs/llava15.py:7b_lora --stage sft --per-device 16 \
      --length 2048 [--accum 4] [--devices 8 --fsdp 8] [--config.model.remat_policy=nothing_saveable]
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def step_memory(config, stage_name: str, per_device: int, length: int, mesh_shape: dict, accum: int = 1,
                loss_chunk: int | None = None, compiler_options: dict | None = None) -> dict:
    """XLA's memory analysis of the stage's step for `per_device` sequences of `length` tokens per device, taken in
    `accum` micro-batches of per_device / accum (the step's accumulation scan), the loss `loss_chunk` tokens at a time
    (None: the step's default), plus what of it is the CPU backend's
    own (`cpu_upcast_bytes`, see `cpu_upcast_bytes`). `compiler_options`: XLA options for the compile (the tests
    lower LLVM's optimisation, which buffer assignment does not depend on)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from uhd_jax.models.vlm import VLM, example_inputs, init_fn
    from uhd_jax.parallel.sharding import BATCH_AXES, logical_shardings, rules_from_config
    from uhd_jax.perf.memory import analysis_bytes, cpu_upcast_bytes
    from uhd_jax.train import optimizer as opt
    from uhd_jax.train.state import TrainState
    from uhd_jax.train.step import make_train_step
    from uhd_jax.train.trainer import model_for_stage, opt_state_shardings

    stage = config.stages[stage_name]
    if config.model.get("slime"):
        config.model.slime.separator_id = 0   # shapes do not depend on it; no tokenizer needed
    cfg = model_for_stage(config, stage)
    devices = np.asarray(jax.devices()[:int(np.prod(list(mesh_shape.values())))])
    mesh = jax.sharding.Mesh(devices.reshape(tuple(mesh_shape.values())), tuple(mesh_shape))
    rules = rules_from_config(config.get("axis_rules"))
    boxed = jax.eval_shape(init_fn(cfg), jax.random.PRNGKey(0))["params"]
    params = nn.meta.unbox(boxed)
    labels = opt.group_labels(params, [tuple(r) for r in stage.trainable])
    tx, _ = opt.make_optimizer(opt.trainable_labels(labels), dict(stage.lrs), 1000,
                               weight_decay=stage.weight_decay, grad_clip_norm=stage.get("grad_clip_norm"))
    split = lambda ps: opt.split_trainable(ps, labels)  # noqa: E731
    p_sh = logical_shardings(boxed, mesh, rules)
    opt_abs = jax.eval_shape(tx.init, split(params)[0])
    o_sh = opt_state_shardings(opt_abs, split(p_sh)[0], mesh)
    rep = NamedSharding(mesh, P())
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_abs)
    state_sh = TrainState(step=rep, params=p_sh, opt_state=o_sh)
    if per_device % accum:
        raise ValueError(f"--per-device {per_device} is not a multiple of --accum {accum}")
    batch_size = per_device // accum * len(devices)
    ids, valid, pos, pixels, image_map = example_inputs(cfg, batch=batch_size, seq_len=length)
    if not isinstance(pixels, dict):
        pixels = {"pixel_values": pixels}
    arrays = dict(input_ids=ids, token_valid=valid, positions=pos, image_token_map=image_map, targets=ids,
                  loss_mask=valid, **pixels)
    batch = {k: jax.ShapeDtypeStruct((accum,) + v.shape, v.dtype) for k, v in arrays.items()}
    batch_sh = {k: NamedSharding(mesh, P(None, BATCH_AXES)) for k in batch}
    step = jax.jit(make_train_step(VLM(cfg), tx, split, 0 if cfg.stochastic_training else None, loss_chunk),
                   in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, rep), donate_argnums=0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        compiled = step.lower(state, batch).compile(compiler_options)
    count = lambda tree: sum(x.size for x in jax.tree_util.tree_leaves(tree) if x is not None)  # noqa: E731
    trainable, frozen = split(params)
    return dict(analysis_bytes(compiled), cpu_upcast_bytes=cpu_upcast_bytes(compiled.as_text()),
                devices=len(devices), mesh=mesh_shape, per_device=per_device, accum=accum, length=length,
                remat_policy=cfg.llm.remat_policy, trained_parameters=count(trainable),
                frozen_parameters=count(frozen))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m uhd_jax.perf.train_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--stage", default="sft")
    p.add_argument("--per-device", type=int, default=16)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--accum", type=int, default=1, help="micro-batches the per-device sequences are taken in")
    p.add_argument("--loss-chunk", type=int, default=None, help="tokens per loss chunk (default: the step's)")
    p.add_argument("--devices", type=int, default=1, help="CPU stand-in devices (the mesh's size)")
    p.add_argument("--fsdp", type=int, default=1)
    p.add_argument("--tensor", type=int, default=1)
    a, extra = p.parse_known_args(argv)
    from uhd_jax.cli_errors import split_overrides

    overrides = split_overrides(extra, p)
    if a.devices > 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={a.devices}")
    from uhd_jax.cli_errors import load_config

    mesh = dict(data=a.devices // (a.fsdp * a.tensor), fsdp=a.fsdp, tensor=a.tensor)
    out = step_memory(load_config(a.config, overrides), a.stage, a.per_device, a.length, mesh, a.accum, a.loss_chunk)
    out.update(config=a.config, stage=a.stage, overrides=overrides, peak_gb=round(out["peak_bytes"] / 1e9, 2),
               peak_gb_without_cpu_upcast=round((out["peak_bytes"] - out["cpu_upcast_bytes"]) / 1e9, 2))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
