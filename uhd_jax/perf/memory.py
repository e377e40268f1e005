"""Device memory of a compiled step from XLA's own buffer assignment (`compiled.memory_analysis()`), with abstract
inputs: no weights and no device of the target's size, so whether a step fits in 80 GB is answered on a CPU.

`peak` is what one device must hold at once: the arguments, the outputs that do not reuse a donated argument, and
the temporaries. XLA's CPU and GPU backends fuse differently (fusion decides which intermediates exist), so a CPU
number estimates the GPU's; it is not its exact value. On the device itself the compiled step can also run, which
measures its time and the allocator's peak.
"""
from __future__ import annotations

import math
import re
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

GB = 1e9


def analysis_bytes(compiled) -> dict:
    """argument / output / temp / alias / peak bytes of a compiled executable."""
    m = compiled.memory_analysis()
    arg, out, temp = int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.temp_size_in_bytes)
    alias = int(m.alias_size_in_bytes)
    # outputs written into donated arguments (the train state) are not held twice
    return {"argument_bytes": arg, "output_bytes": out, "temp_bytes": temp, "alias_bytes": alias,
            "peak_bytes": arg + out - alias + temp}


_ENTRY_PARAM = re.compile(r"^\s*%(\S+) = bf16\[([\d,]*)\]\{[^}]*\} parameter\(")
_ENTRY_UPCAST = re.compile(r"^\s*%\S+ = f32\[([\d,]*)\]\{[^}]*\} (?:fusion|convert)\(%(\S+?)\)[,\s]")


def cpu_upcast_bytes(hlo_text: str) -> int:
    """Bytes of float32 copies of whole bfloat16 arguments in a compiled CPU step (`compiled.as_text()`).

    XLA:CPU has no bfloat16 dynamic-slice: its float normalisation upcasts the operand, so the scan over layers
    slices a float32 copy of each stacked bf16 weight, and loop-invariant code motion hoists that copy out of the
    loop, where it lives for the whole step (about 27 GB for a 7B base). A GPU slices and multiplies bf16 as is. The
    copies are the entry computation's converts of a bf16 parameter to float32 at the same shape."""
    entry = hlo_text[hlo_text.index("\nENTRY"):] if "\nENTRY" in hlo_text else ""
    bf16_params = {}
    total = 0
    for line in entry.splitlines()[1:]:
        m = _ENTRY_PARAM.match(line)
        if m:
            bf16_params[m.group(1)] = m.group(2)
            continue
        m = _ENTRY_UPCAST.match(line)
        if m and bf16_params.get(m.group(2)) == m.group(1):
            total += 4 * math.prod(int(d) for d in m.group(1).split(",") if d)
    return total


def _jbu_step(config, stage_name: str, batch: int):
    """The `jbu` stage's real train step (`make_jbu_step`: the stage's model, dtypes and optimizer, state donated as
    `run_jbu_stage` does), its abstract state and images for `batch` images, and the stage's pieces."""
    from uhd_jax.train import optimizer as opt
    from uhd_jax.train.jbu_stage import TRAINED, JBUTraining, make_jbu_step, vdim_spec
    from uhd_jax.train.state import TrainState
    from uhd_jax.train.trainer import model_for_stage

    stage = config.stages[stage_name]
    cfg = model_for_stage(config, stage)
    size = int(stage.get("image_size") or cfg.vision.image_size)
    training = JBUTraining(cfg.vision, vdim_spec(stage), size, bool(stage.get("channel_norm", True)))
    tx = optax.chain(opt.clip_first_steps(float(stage.get("warm_clip_norm", 1e-4)),
                                          int(stage.get("warm_clip_steps", 10))),
                     opt.torch_nadam(float(stage.lr)))
    params = jax.eval_shape(lambda r: nn.meta.unbox(training.init(r)), jax.random.PRNGKey(0))
    trainable = {k: params[k] for k in TRAINED}
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                       opt_state=jax.eval_shape(tx.init, trainable))
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    step = jax.jit(make_jbu_step(training, tx, int(config.seed)), donate_argnums=0)
    count = lambda tree: sum(x.size for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    info = dict(batch=batch, image_size=size, n_jitters=training.spec.n_jitters,
                vision_dtype=jnp.dtype(cfg.vision.dtype).name, trained_parameters=count(trainable),
                frozen_parameters=count(params["vision"]))
    return step, state, images, training, tx, info


def jbu_step_memory(config, stage_name: str, batch: int, steps: int = 0, warmup: int = 1) -> dict:
    """XLA's memory analysis of the `jbu` stage's real train step for `batch` images on one device, compiled from
    abstract shapes. With `steps`, the same compiled step then runs on random weights and images: `warmup` untimed
    steps, `steps` timed ones (median/min/max seconds, images/s) and the device allocator's peak where the backend
    reports one (GPUs; not the CPU)."""
    from uhd_jax.train.jbu_stage import TRAINED
    from uhd_jax.train.state import TrainState

    step, state, images, training, tx, info = _jbu_step(config, stage_name, batch)
    compiled = step.lower(state, images).compile()
    out = analysis_bytes(compiled)
    out.update(info)
    if steps < 1:
        return out
    params = jax.jit(lambda r: nn.meta.unbox(training.init(r)))(jax.random.PRNGKey(0))
    live = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=jax.jit(tx.init)({k: params[k] for k in TRAINED}))
    # normalised pixels: the featurizer sees what the stage's preparer gives it, values around 0 with unit spread
    pixels = jax.random.normal(jax.random.PRNGKey(1), images.shape, images.dtype)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        live, metrics = compiled(live, pixels)
        jax.block_until_ready(metrics)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    stats = jax.devices()[0].memory_stats() or {}
    median = statistics.median(times)
    out.update(step_s={"median": median, "min": min(times), "max": max(times)}, images_per_s=batch / median,
               timed_steps=steps, loss=float(metrics["loss"]), measured_peak_bytes=stats.get("peak_bytes_in_use"))
    return out
