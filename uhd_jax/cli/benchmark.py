"""Measure speed: the train step, generation, the host data pipeline, and the paper's compute claim.

  uhd-benchmark --config configs/uhd_v2.py:7b --stage sft --mode train --batch-size 8 --steps 20 \
      --images 672x1088,1920x1080,336x336 [--seq-len 2048] [--peak-tflops 989]
  uhd-benchmark --config configs/uhd_v2.py:7b --mode generate [--max-new-tokens 64]
  uhd-benchmark --config configs/uhd_v2.py:7b --stage sft --mode data [--workers 0,1,4]
  uhd-benchmark --config configs/uhd_v2.py:7b --stage jbu --mode memory --batch-size 16 [--execute]
  uhd-benchmark --compare-compute
  uhd-benchmark --table benchmarks/results.jsonl

The model is built from the config with random weights (abstract init, sharded over `config.mesh`; no checkpoint).
Train mode compiles, warms up, then times each step with device synchronisation and reports step time (median, min,
max), tokens/s, images/s, model TFLOP/s and MFU (model FLOPs by formula, `uhd_jax/perf/flops.py`, against the peak
given or detected), XLA's own FLOP count of the step for comparison, peak device memory, compile time and the
number of compilations. Memory mode compiles the `jbu` stage's real step for --batch-size images on one device from
abstract inputs (no weights; any machine, the CPU included) and reports XLA's own buffer assignment: argument,
output, temporary and peak bytes (`uhd_jax/perf/memory.py`); with --execute it then runs that step (random weights,
--warmup + --steps steps) for its time and the allocator's peak. Results append to a JSON-lines file (`--out`,
default benchmarks/results.jsonl) with when, where and on what they were measured (UTC time, commit, package
versions, device); `--label` names the measurement (benchmarks/gpu.sh's rows) and `--table FILE` prints a file's
lines as a table (`uhd_jax/perf/report.py`). `--config.KEY=VALUE` overrides a config entry as uhd-train's flag does
(e.g. --config.model.attention_impl=cudnn on a GPU). The flags are spelled as in uhd-generate (--batch-size,
--max-new-tokens); the older --batch and --new-tokens still work.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import tempfile
import time

from absl import flags, logging  # noqa: E402

flags.FLAGS.mark_as_parsed()
logging.set_verbosity(logging.WARNING)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from uhd_jax.cli_errors import UserError, load_config, reports_user_errors, split_overrides  # noqa: E402
from uhd_jax.data.batch import BatchShape  # noqa: E402
from uhd_jax.data.dataset import load_tokenizer  # noqa: E402
from uhd_jax.data.uhd_images import fit_to_bucket  # noqa: E402
from uhd_jax.data.pipeline import Source, make_iterator  # noqa: E402
from uhd_jax.eval.decoding import GenerationConfig  # noqa: E402
from uhd_jax.eval.generate import Generator  # noqa: E402
from uhd_jax.models.layers import resolve_attention_impl  # noqa: E402
from uhd_jax.models.vlm import VLM, init_fn  # noqa: E402
from uhd_jax.parallel.mesh import make_mesh  # noqa: E402
from uhd_jax.parallel.sharding import rules_from_config  # noqa: E402
from uhd_jax.perf import flops  # noqa: E402
from uhd_jax.perf.memory import GB, jbu_step_memory  # noqa: E402
from uhd_jax.perf.report import provenance as report_provenance  # noqa: E402
from uhd_jax.perf.workload import parse_sizes, prepared_batches, write_workload  # noqa: E402
from uhd_jax.train import optimizer as opt  # noqa: E402
from uhd_jax.train.step import model_inputs  # noqa: E402
from uhd_jax.train.trainer import (batch_to_device, build_training, model_for_stage, packed_layout,  # noqa: E402
                                   preparer_factory, stage_model)

# dense bf16 peak TFLOP/s by device kind (vendor datasheets, no sparsity)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v5p": 459.0, "TPU v4": 275.0, "TPU v5 lite": 197.0}


def detected_peak(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in PEAK_TFLOPS.items() if k.lower() in kind.lower()), None)


def peak_memory(device) -> int | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return (stats or {}).get("peak_bytes_in_use")


def load(a):
    config = load_config(a.config, a.overrides)
    if a.stage is not None and a.stage not in config.stage_order:
        raise UserError(f"--stage {a.stage}: {a.config} has no such stage; choose from {list(config.stage_order)}")
    stage = config.stages[a.stage or list(config.stage_order)[-1]]
    if stage.get("kind", "llava") == "jbu":
        llava = [s for s in config.stage_order if config.stages[s].get("kind", "llava") != "jbu"]
        raise UserError(f"--stage {a.stage} trains the JBU alone; benchmark a LLaVA stage ({llava}), or its step's "
                        f"memory with --mode memory")
    stage.batch_size, stage.grad_accum = a.batch, 1
    if a.seq_len:
        stage.max_length = a.seq_len
    if a.mesh:
        config.mesh = dict(zip(("data", "fsdp", "tensor"), (int(x) for x in a.mesh.split(","))))
    return config, stage


def memory_mode(a) -> dict:
    config = load_config(a.config, a.overrides)
    jbu = [s for s in config.stage_order if config.stages[s].get("kind", "llava") == "jbu"]
    name = a.stage or (jbu[0] if jbu else None)
    if name not in jbu:
        raise UserError(f"--mode memory compiles a JBU stage's step; {a.config} has "
                        + (f"{jbu}" if jbu else "none") + (f", not --stage {name}" if name else ""))
    t0 = time.perf_counter()
    result = jbu_step_memory(config, name, a.batch, a.steps if a.execute else 0, a.warmup)
    out = {"mode": "memory", "config": a.config, "stage": name, "devices": 1,
           "compile_s": time.perf_counter() - t0, **result}
    out.update({k.replace("_bytes", "_gb"): v / GB for k, v in result.items()
                if k.endswith("_bytes") and v is not None})
    # what a target is judged on: the allocator's peak where the step ran on a device that reports one
    out["peak_gb_judged"] = out.get("measured_peak_gb", out["peak_gb"])
    return out


def vocab(config) -> int:
    return min(512, int(config.model.llm.vocab_size))


def use_workload(a, config, name: str, sizes, n_samples: int, words: int, vocab_size: int | None = None) -> dict:
    """Write (or reuse) the workload under `--workdir` or a temp folder and point `config` at its tokenizer."""
    root = a.workdir or os.path.join(tempfile.gettempdir(), f"uhd-jax-benchmark-{name}")
    paths = write_workload(root, sizes, n_samples, words, vocab_size=vocab_size or vocab(config))
    config.tokenizer, config.data_root = os.path.abspath(paths["tokenizer"]), ""
    return paths


def workload(a, config, stage, n_batches):
    words = max(8, int(stage.max_length))   # more than fits: every sequence is filled to the budget
    paths = use_workload(a, config, "train", parse_sizes(a.images), max(a.batch, 8), words)
    cfg = model_for_stage(config, stage)
    try:
        batches, shape = prepared_batches(config, stage, cfg, paths, a.batch, n_batches)
    except ValueError as e:   # a sample the stage refuses: its image tokens do not fit the sequence
        raise UserError(f"{e}; raise --seq-len or give smaller --images") from None
    return cfg, batches, shape, paths


def train_mode(a) -> dict:
    config, stage = load(a)
    try:
        mesh = make_mesh(dict(config.mesh))
    except ValueError as e:
        raise UserError(f"mesh: {e}; give --mesh data,fsdp,tensor with a product of {len(jax.devices())}") from None
    cfg, batches, shape, _ = workload(a, config, stage, n_batches=2)
    rules = rules_from_config(config.get("axis_rules"))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        setup = build_training(config, stage, cfg, mesh, rules, int(config.seed), a.steps + a.warmup)
        step_fn = setup.step_fn(VLM(cfg), shape.array_keys, int(config.seed) if cfg.stochastic_training else None)
        device_batches = [batch_to_device(b, 1, mesh) for b in batches]
        lowered = step_fn.lower(setup.state, device_batches[0])
        xla_step_flops = flops.xla_flops(lowered)
        state = setup.state
        t0 = time.perf_counter()
        state, metrics = step_fn(state, device_batches[0])
        jax.block_until_ready(metrics)
        first = time.perf_counter() - t0
        for i in range(a.warmup):
            state, metrics = step_fn(state, device_batches[(i + 1) % 2])
        jax.block_until_ready(metrics)
        times = []
        for i in range(a.steps):
            t0 = time.perf_counter()
            state, metrics = step_fn(state, device_batches[i % 2])
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
        compilations = step_fn._cache_size()

    labels = jax.tree_util.tree_flatten_with_path(setup.labels)[0]
    trains = {part: any(str(path[0].key) == part and g != opt.FROZEN for path, g in labels)
              for part in ("vision", "projector", "llm")}
    b0 = batches[0]
    if cfg.packed_images:
        seg = b0["patch_segment_ids"]
        per_image = [int((row == k).sum()) for row in seg for k in range(1, int(row.max()) + 1)]
    else:
        n_img = int(b0["image_valid"].sum())
        per_image = [cfg.vision.grid ** 2 + 1] * n_img
    model_flops = flops.StepFlops(
        vision=flops.vit_forward_flops(cfg.vision, per_image),
        projector=flops.projector_flops(cfg, b0),
        llm=flops.llm_forward_flops(cfg.llm, shape.max_length, a.batch),
        multipliers=flops.multipliers(trains["vision"], trains["projector"], trains["llm"]))
    median = statistics.median(times)
    n_images = int((b0["image_token_map"] >= 0).any(axis=1).sum())   # samples' images (UHD: not slices)
    device = jax.devices()[0]
    peak = a.peak_tflops or detected_peak(device)
    tflops = model_flops.train / median / 1e12
    n_devices = len(jax.devices())
    result = {
        "mode": "train", "config": a.config, "stage": a.stage or list(config.stage_order)[-1], "batch": a.batch,
        "seq_len": shape.max_length, "images": a.images, "images_per_step": n_images,
        "vision_inputs_per_step": len(per_image),
        "tokens_per_step": int(np.sum(b0["token_valid"])), "trains": trains,
        "step_s": {"median": median, "min": min(times), "max": max(times)},
        "tokens_per_s": int(np.sum(b0["token_valid"])) / median, "images_per_s": n_images / median,
        "model_tflop_per_step": model_flops.train / 1e12, "forward_tflop": model_flops.forward / 1e12,
        "components_forward_tflop": {"vision": model_flops.vision / 1e12, "projector": model_flops.projector / 1e12,
                                     "llm": model_flops.llm / 1e12},
        "xla_tflop_per_step": xla_step_flops / 1e12, "xla_counts_scanned_layers_once": cfg.llm.scan_layers,
        # XLA counts a loop's body once: the CPU's attention maps over batch rows (and skips the causal upper half)
        "xla_counts_llm_attention_rows_once": resolve_attention_impl(
            cfg.llm.attention_impl, dtype=cfg.dtype, head_dim=cfg.llm.dim_per_head, q_len=shape.max_length,
            kv_len=shape.max_length, is_causal=True, has_mask=False) == "chunked",
        "model_tflops_per_s": tflops,
        "mfu": tflops / (peak * n_devices) if peak else None, "peak_tflops_per_device": peak,
        "first_step_s": first, "compile_s_estimate": first - median, "compilations": compilations,
        "peak_memory_bytes": peak_memory(device), "devices": n_devices,
        "device": getattr(device, "device_kind", str(device)), "dtype": str(cfg.dtype.__name__),
        "remat": cfg.llm.remat_policy, "attention": cfg.llm.attention_impl}
    if a.compare == "torch":
        try:
            from uhd_jax.perf.torch_reference import torch_train_step   # torch only when asked for
        except ImportError as e:
            raise UserError(f"--compare torch needs PyTorch and transformers ({e}); install them or drop the flag") \
                from None

        theirs = torch_train_step(stage_model(config, stage), trains, a.batch, shape.max_length, a.steps, a.warmup)
        result["torch"] = theirs
        result["speedup_vs_torch"] = result["tokens_per_s"] / theirs["tokens_per_s"]
    return result


def generate_mode(a) -> dict:
    config, stage = load(a)
    size = parse_sizes(a.images)[0]
    paths = use_workload(a, config, "generate", [size], 1, a.prompt_words)
    cfg = model_for_stage(config, stage)
    prep = preparer_factory(config, stage, cfg)(Source(paths["json"], paths["images"]))
    sample = json.load(open(paths["json"]))[0]
    sample["conversations"][0]["value"] = "<image>\n" + sample["conversations"][1]["value"]   # the prompt words
    prompt = prep.prompt(sample)
    tok = load_tokenizer(paths["tokenizer"])
    layout = packed_layout(config, cfg, stage)
    try:   # a prompt past the model's positions would time a computation no model runs
        Generator(cfg, None, tok, GenerationConfig(max_new_tokens=a.new_tokens), packed_layout=layout).bucket(
            prompt, f"the prompt of --prompt-words {a.prompt_words} and a {size[0]}x{size[1]} image")
    except ValueError as e:
        raise UserError(f"{e}; lower --prompt-words or --new-tokens") from None
    params = nn.meta.unbox(jax.jit(init_fn(cfg))(jax.random.PRNGKey(0))["params"])
    out = {"mode": "generate", "config": a.config, "image": f"{size[0]}x{size[1]}", "prompt_tokens": len(prompt["ids"]),
           "prompt_words": a.prompt_words, "new_tokens": a.new_tokens}
    for batch in (1, 32):
        timings = {}
        for n in (1, a.new_tokens):
            # no EOS: every row decodes exactly n tokens
            gen = Generator(cfg, params, tok, GenerationConfig(max_new_tokens=n, eos_id=-1), batch_size=batch,
                            packed_layout=layout)
            gen([prompt] * batch)   # compile
            runs = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                gen([prompt] * batch)
                runs.append(time.perf_counter() - t0)
            timings[n] = statistics.median(runs)
        decode_s = (timings[a.new_tokens] - timings[1]) / max(a.new_tokens - 1, 1)
        # None: decoding a few tokens took less than the timing noise of the prefill (tiny models)
        out[f"batch{batch}"] = {"prefill_s": timings[1], "decode_tokens_per_s": batch / decode_s if decode_s > 0
                                else None}
    item = np.dtype(cfg.dtype).itemsize   # the KV cache is kept in the compute dtype
    # the weights as stored (--config.model.param_dtype=bfloat16 for inference; float32 weights read twice the bytes)
    weight_bytes = sum(x.dtype.itemsize * x.size for x in jax.tree_util.tree_leaves(params["llm"]))
    # a decode step reads every weight once and, per row, the K and V of its context (mid-generation on average)
    context = len(prompt["ids"]) + a.new_tokens // 2
    kv_bytes = 2 * cfg.llm.num_layers * cfg.llm.num_kv_heads * cfg.llm.dim_per_head * item * context
    bandwidth = a.bandwidth_gbs or measured_bandwidth_gbs()
    cache = int(a.cache_mb * 2 ** 20) if a.cache_mb is not None else last_level_cache_bytes(jax.devices()[0])
    out.update(llm_weight_bytes=int(weight_bytes), kv_bytes_per_row=int(kv_bytes), bandwidth_gbs=bandwidth,
               bandwidth_measured=not a.bandwidth_gbs, last_level_cache_bytes=cache)
    for batch in (1, 32):
        r = out[f"batch{batch}"]
        r.update(decode_bound(weight_bytes, kv_bytes, batch, bandwidth, cache))
        measured, bound = r["decode_tokens_per_s"], r["bandwidth_bound_tokens_per_s"]
        r["fraction_of_bound"] = measured / bound if measured and bound else None
    out.update(llm_param_dtype=str(jax.tree_util.tree_leaves(params["llm"])[0].dtype))
    return out


def decode_bound(weight_bytes: int, kv_bytes: int, batch: int, bandwidth_gbs: float, cache: int | None) -> dict:
    """Tokens/s if every decode step streamed the weights and each row's K/V from device memory at the measured
    bandwidth. A working set that fits in the last-level cache is read from the cache after the first step, so the
    bound does not apply there (the CPU demo models: measured decode ran 2x past it)."""
    read = weight_bytes + batch * kv_bytes
    sizes = (f"{weight_bytes / 1e6:.1f} MB weights + {batch} x {kv_bytes / 1e6:.2f} MB KV = {read / 1e6:.1f} MB")
    if cache is not None and read <= cache:
        return {"bandwidth_bound_tokens_per_s": None,
                "bandwidth_bound": f"n/a (weights fit in cache): {sizes} <= {cache / 1e6:.1f} MB last-level cache"}
    bound = batch * bandwidth_gbs * 1e9 / read
    where = (f"> {cache / 1e6:.1f} MB last-level cache" if cache is not None
             else "(cache size unknown: holds while that is far above the device's caches)")
    return {"bandwidth_bound_tokens_per_s": bound,
            "bandwidth_bound": f"{bound:.0f} tokens/s at {bandwidth_gbs:.1f} GB/s: {sizes} {where}"}


# on-chip L2 by device kind (vendor whitepapers); other accelerators: unknown, --cache-mb gives it
GPU_L2_BYTES = {"H100": 50 * 2 ** 20, "H200": 50 * 2 ** 20, "A100": 40 * 2 ** 20}


def last_level_cache_bytes(device) -> int | None:
    """The largest cache in front of the device's memory: the CPU's last level (Linux sysfs), a known GPU's L2."""
    if device.platform != "cpu":
        kind = getattr(device, "device_kind", "")
        return next((v for k, v in GPU_L2_BYTES.items() if k.lower() in kind.lower()), None)
    levels = {}
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(os.path.join(index, "level")) as f:
                level = int(f.read())
            with open(os.path.join(index, "size")) as f:
                size = f.read().strip()
        except (OSError, ValueError):
            continue
        scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(size[-1:].upper(), 1)
        digits = size.rstrip("KMGkmg")
        if digits.isdigit():
            levels[level] = int(digits) * scale
    return levels[max(levels)] if levels else None


def measured_bandwidth_gbs(mbytes: int = 256) -> float:
    """Device memory bandwidth: a jitted elementwise pass reads and writes an array of `mbytes`, median of 5."""

    x = jnp.ones((mbytes * 2 ** 20 // 4,), jnp.float32)
    f = jax.jit(lambda v: v * 1.0001)
    jax.block_until_ready(f(x))
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        runs.append(time.perf_counter() - t0)
    return 2 * x.nbytes / statistics.median(runs) / 1e9


def data_mode(a) -> dict:
    config, stage = load(a)
    paths = use_workload(a, config, "data", parse_sizes(a.images), max(4 * a.batch, 16), 64)
    cfg = model_for_stage(config, stage)
    shape = BatchShape(a.batch, stage.max_length, config.data.max_images * cfg.views_per_image, cfg.vision.image_size,
                       packed_layout(config, cfg, stage))
    out = {"mode": "data", "config": a.config, "images": a.images, "batch": a.batch, "images_per_s": {}}
    for workers in (int(w) for w in a.workers.split(",")):
        it = make_iterator([Source(paths["json"], paths["images"])], preparer_factory(config, stage, cfg), shape,
                           seed=0, num_workers=workers)
        next(it)   # start-up (worker processes) is not throughput
        t0 = time.perf_counter()
        for _ in range(a.steps):
            next(it)
        out["images_per_s"][workers] = a.steps * a.batch / (time.perf_counter() - t0)
    return out


def compare_compute(a) -> dict:
    """Forward FLOPs (XLA cost analysis of the lowered model, abstract weights) of UHD v1 on a 672x1088 image vs
    LLaVA-1.5 on 336x336, same LLM, and the text the paper's 94% claim compares."""
    size = a.compute_size
    # one tokenizer every compared model reads
    small = vocab(load_config(f"configs/llava15.py:{a.compute_llm}", flag="--compute-llm"))
    out = {"mode": "compare_compute", "image": f"{size[0]}x{size[1]}",
           "prompt": "one image, a 7-word request, a 4-word answer"}
    llm = a.compute_llm
    for name, spec in ((f"llava15:{llm}", f"configs/llava15.py:{llm}"), (f"uhd_v1:{llm}", f"configs/uhd_v1.py:{llm}"),
                       ("uhd_v1:arxiv64", "configs/uhd_v1.py:arxiv64")):
        if name.endswith("arxiv64") and llm != "13b":
            continue
        config = load_config(spec)
        config.model.scan_layers = False   # XLA's cost analysis counts a loop body once: unroll the layers
        if config.data.get("slicing"):     # the image as given: no training augmentation
            config.data.slicing.update(augment_prob=0.0, textvqa_long_side=0)
        stage = config.stages[list(config.stage_order)[-1]]
        paths = use_workload(a, config, "compute", [size], 1, 4, vocab_size=small)
        cfg = model_for_stage(config, stage)
        # the sequence holds exactly the prompt: no padding counted
        stage.max_length = 4096
        (batch,), _ = prepared_batches(config, stage, cfg, paths, 1, 1)
        n = int(batch["token_valid"].sum())
        batch = {k: (v[:, :n] if v.ndim >= 2 and v.shape[1] == 4096 else v) for k, v in batch.items()}
        if cfg.packed_images:   # the patch budget generation packs this image into (--patch-buckets 1: training's)
            batch, _ = fit_to_bucket(batch, packed_layout(config, cfg, stage), a.patch_buckets)
        model = VLM(cfg)
        params = jax.eval_shape(init_fn(cfg), jax.random.PRNGKey(0))
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
        lowered = jax.jit(lambda p, b: model.apply(nn.meta.unbox(p), *model_inputs(b))[0]).lower(params, abstract)
        if cfg.packed_images:
            seg = batch["patch_segment_ids"][0]
            per_image = [int((seg == k).sum()) for k in range(1, int(seg.max()) + 1)]
        else:
            per_image = [cfg.vision.grid ** 2 + 1]
        total = flops.xla_flops(lowered)
        vit, llm_f = flops.vit_forward_flops(cfg.vision, per_image), flops.llm_forward_flops(cfg.llm, n)
        out[name] = {"tokens": n, "vision_inputs": len(per_image), "vision_tokens": sum(per_image),
                     "forward_tflop_xla": total / 1e12, "vision_tflop_formula": vit / 1e12,
                     "llm_tflop_formula": llm_f / 1e12, "rest_tflop": (total - vit - llm_f) / 1e12,
                     "vision_slots": int(batch["patch_segment_ids"].shape[1]) if cfg.packed_images else len(per_image),
                     "vision_xla_over_formula": flops.vision_xla_flops(cfg, batch) / vit}
    base = out[f"llava15:{llm}"]["forward_tflop_xla"]
    for name in list(out):
        if isinstance(out[name], dict) and name.startswith("uhd_v1"):
            out[name]["relative_to_llava15"] = out[name]["forward_tflop_xla"] / base
    return out


def positive_sizes(a, p) -> None:
    """Numbers and sizes checked before any model is built: a typo costs a message, not a compile."""
    for flag, name in (("batch", "batch-size"), ("steps", "steps"), ("repeats", "repeats"),
                       ("new_tokens", "max-new-tokens"), ("prompt_words", "prompt-words")):
        if getattr(a, flag) < 1:
            p.error(f"--{name} {getattr(a, flag)}: give at least 1")
    if a.warmup < 0 or a.seq_len < 0 or (a.cache_mb or 0) < 0:
        p.error("--warmup, --seq-len and --cache-mb cannot be negative")
    for flag in ("images", "compute_size"):
        try:
            sizes = parse_sizes(getattr(a, flag))
        except ValueError as e:
            p.error(f"--{flag.replace('_', '-')}: {e}")
        if any(w < 1 or h < 1 for w, h in sizes):
            p.error(f"--{flag.replace('_', '-')} {getattr(a, flag)}: sizes must be at least 1x1")
    if a.mesh is not None:
        parts = a.mesh.split(",")
        if len(parts) != 3 or not all(x.strip().lstrip("-").isdigit() for x in parts):
            p.error(f"--mesh {a.mesh}: give three sizes data,fsdp,tensor, e.g. 8,1,1 (one may be -1)")
    workers = a.workers.split(",")
    if not all(w.strip().isdigit() for w in workers):
        p.error(f"--workers {a.workers}: give worker counts separated by commas, e.g. 0,1,4")


@reports_user_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config")
    p.add_argument("--stage", default=None, help="default: the config's last stage")
    p.add_argument("--mode", choices=("train", "generate", "data", "memory"), default="train")
    p.add_argument("--batch-size", "--batch", dest="batch", type=int, default=8,
                   help="per step (memory mode: images; generate mode times batches of 1 and 32)")
    p.add_argument("--seq-len", type=int, default=0, help="default: the stage's max_length")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--images", default="672x1088,1920x1080,336x336", help="image sizes WxH, cycled over samples")
    p.add_argument("--mesh", default=None, help="data,fsdp,tensor sizes (default: the config's)")
    p.add_argument("--peak-tflops", type=float, default=None, help="per device (default: detected)")
    p.add_argument("--max-new-tokens", "--new-tokens", dest="new_tokens", type=int, default=64,
                   help="generate mode: tokens decoded per row (exactly: no EOS stops a row)")
    p.add_argument("--repeats", type=int, default=5, help="generate mode: timed runs per measurement (median)")
    p.add_argument("--prompt-words", type=int, default=32)
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="device memory bandwidth for the decode bound")
    p.add_argument("--cache-mb", type=float, default=None,
                   help="last-level cache in MiB for the decode bound (default: detected; 0: bound always applies)")
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--compare", choices=("torch",), default=None,
                   help="train mode: also time transformers' LLaVA (same towers, MLP projector) in PyTorch")
    p.add_argument("--compare-compute", action="store_true")
    p.add_argument("--patch-buckets", type=int, default=8,
                   help="--compare-compute: UHD patch-budget buckets as generation uses them (1: the full budget)")
    p.add_argument("--compute-llm", default="13b", help="LLM size for --compare-compute (13b: the paper's)")
    p.add_argument("--compute-size", default="672x1088")
    p.add_argument("--workdir", default=None, help="workload cache (default: a temp folder)")
    p.add_argument("--execute", action="store_true",
                   help="memory mode: also run the compiled step (--warmup, then --steps timed) for time and peak")
    p.add_argument("--label", default=None, help="a name for this measurement, recorded in its result line")
    p.add_argument("--out", default="benchmarks/results.jsonl")
    p.add_argument("--table", default=None, metavar="FILE", help="print FILE's result lines as a table and exit")
    a, extra = p.parse_known_args(argv)
    if a.table:
        from uhd_jax.perf import report

        if not os.path.isfile(a.table):
            raise UserError(f"--table {a.table}: no such results file")
        print(report.table(report.read_lines(a.table)))
        return 0
    a.overrides = split_overrides(extra, p)
    positive_sizes(a, p)
    if a.compare_compute:
        if a.overrides:
            p.error("--config.KEY=VALUE overrides --config; --compare-compute compares fixed configs")
        a.compute_size = parse_sizes(a.compute_size)[0]
        result = compare_compute(a)
    else:
        if not a.config:
            p.error("--config is required (except with --compare-compute)")
        result = {"train": train_mode, "generate": generate_mode, "data": data_mode, "memory": memory_mode}[a.mode](a)
    device = jax.devices()[0]
    result.setdefault("device", getattr(device, "device_kind", str(device)))
    result.update(date=time.strftime("%Y-%m-%d"), jax=jax.__version__, backend=jax.default_backend(),
                  device_count=len(jax.devices()), **report_provenance())
    if a.label:
        result["label"] = a.label
    print(json.dumps(result, indent=2))
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
