"""Padding on a realistic length mix: fixed `max_length` rows against length buckets (data/buckets.py), and the
bucket set that pads least, from a written model of LLaVA-1.5's SFT mix (llava_v1_5_mix665k.json).

The length model (a model, not a measurement of the file, which is not on this machine):
  source counts   the LLaVA-1.5 paper's Table 7 (Liu et al. 2023, "Improved Baselines with Visual Instruction
                  Tuning"): LLaVA-Instruct 158K (58K conversation, 23K detail, 77K reasoning, the LLaVA-Instruct-158K
                  release's split), ShareGPT 40K (text only), VQAv2 83K, GQA 72K, OKVQA 9K, OCR-VQA 80K, A-OKVQA 66K,
                  TextCaps 22K, RefCOCO 48K, VG 86K: 664K.
  text tokens     per source a log-normal (median, sigma) of Vicuna tokens in the vicuna_v1 template (its ~35-token
                  system prompt included), estimated from each source's format in the released JSON: the academic
                  VQA sources merge all questions of an image into one multi-turn sample with short answers and
                  the "Answer the question using a single word or phrase." prompt; RefCOCO / VG are many short region
                  turns; ShareGPT turns are long and cut at max_length. Medians and sigmas are our estimates.
  image tokens    LLaVA-1.5: 576 per image (CLIP-L/336, 24 x 24). UHD: the real slicer (`best_grid`, M=7,
                  336^2 slices) and spatial schema on each source's typical image sizes (COCO 640x480 / 480x640 for
                  LLaVA-Instruct, VQAv2, OKVQA, A-OKVQA, RefCOCO; VG 800x600 / 500x375 for GQA and VG; book covers
                  ~330x500 for OCR-VQA; OpenImages 1024x768 for TextCaps).
`python -m uhd_jax.perf.lengths` prints the report (JSON); `--cpu-steps N` adds real tokens/s of a tiny LLaVA-1.5
train step on this machine's CPU, fixed rows against buckets, on the same mix scaled to the tiny max_length.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np

from uhd_jax.data.buckets import bucket_of, window_batches_order

# (source, samples, text median, text sigma, typical image sizes (w, h); () = no image)
COCO = ((640, 480), (480, 640), (640, 427), (500, 375))
VG = ((800, 600), (500, 375), (800, 533))
MIX665K = (
    ("llava_conversation", 58_000, 300, 0.45, COCO),
    ("llava_detail", 23_000, 190, 0.25, COCO),
    ("llava_reasoning", 77_000, 240, 0.30, COCO),
    ("sharegpt", 40_000, 1100, 0.75, ()),
    ("vqav2", 83_000, 150, 0.45, COCO),
    ("gqa", 72_000, 210, 0.50, VG),
    ("okvqa", 9_000, 70, 0.30, COCO),
    ("ocrvqa", 80_000, 130, 0.30, ((330, 500), (300, 475), (500, 500))),
    ("aokvqa", 66_000, 110, 0.35, COCO),
    ("textcaps", 22_000, 75, 0.20, ((1024, 768), (1024, 683), (768, 1024))),
    ("refcoco", 48_000, 280, 0.50, COCO),
    ("vg", 86_000, 330, 0.50, VG),
)
# LLaVA's pretraining set (LCS-558K, blip_laion_cc_sbu_558k.json): one short BLIP caption per image in the plain
# template (image, caption, newline); its ~10-word captions modelled as 16 tokens median.
LCS558K = (("lcs558k", 558_000, 16, 0.35, ((500, 375), (640, 480), (375, 500))),)


def llava15_image_tokens(size) -> int:
    return 576


def uhd_image_tokens(size, *, query_grid: int = 12, schema: str = "grid", max_slices: int = 7,
                     scale_resolution: int = 336) -> int:
    """Tokens of one image in a UHD sequence: slices and overview, query_grid^2 each, plus the schema's separators."""
    from uhd_jax.data.slicing import COMMA, NEWLINE, best_grid
    from uhd_jax.models.spatial_schema import image_layout

    grid = best_grid(size[0], size[1], max_slices, scale_resolution)
    seps = [] if grid is None else [COMMA if x < grid[0] - 1 else NEWLINE for _ in range(grid[1])
                                    for x in range(grid[0])]
    return len(image_layout(grid, seps, query_grid=query_grid, schema=schema)[0])


def draw_lengths(image_tokens=llava15_image_tokens, *, max_length: int, scale: float = 1.0, seed: int = 0,
                 mix=MIX665K) -> np.ndarray:
    """One token length per sample of the modelled mix (text x `scale` + image tokens), truncated to max_length, in
    a seeded random order (the pipeline's shuffle)."""
    rng = np.random.default_rng(seed)
    out = []
    for _, n, median, sigma, sizes in mix:
        text = np.maximum(8, np.round(scale * median * np.exp(sigma * rng.standard_normal(n)))).astype(np.int64)
        if sizes:
            per_size = np.array([image_tokens(s) for s in sizes])
            text = text + per_size[rng.integers(len(sizes), size=n)]
        out.append(text)
    lengths = np.minimum(np.concatenate(out), max_length)
    return lengths[rng.permutation(len(lengths))]


def batch_maxima(lengths: np.ndarray, batch_size: int, window: int, seed: int = 0) -> np.ndarray:
    """The longest sample of each batch the bucketing forms from `lengths` in stream order (whole windows only)."""
    size = window * batch_size
    maxima = []
    for w in range(len(lengths) // size):
        chunk = lengths[w * size:(w + 1) * size]
        maxima += [chunk[run].max() for run in window_batches_order(chunk, batch_size, seed, w)]
    return np.asarray(maxima)


def _bucketed(maxima: np.ndarray, buckets: tuple) -> np.ndarray:
    """Each batch's length: the smallest bucket holding its longest sample (`bucket_of`, vectorised)."""
    b = np.asarray(buckets)
    return b[np.searchsorted(b, maxima, side="left")]


def padding(lengths: np.ndarray, buckets: tuple, batch_size: int, window: int, maxima=None) -> dict:
    """Pad fraction and tokens per step, every row at max(buckets) (fixed) against `buckets`."""
    maxima = batch_maxima(lengths, batch_size, window) if maxima is None else maxima
    used = lengths[:len(maxima) * batch_size]
    real = float(used.sum())
    per_batch = _bucketed(maxima, buckets)
    slots = float(batch_size * per_batch.sum())
    fixed = float(len(used) * max(buckets))
    hist = {int(b): int(c) for b, c in zip(*np.unique(per_batch, return_counts=True))}
    return {"buckets": list(buckets), "window": window, "batch_size": batch_size, "mean_length": real / len(used),
            "pad_fixed": 1 - real / fixed, "pad_bucketed": 1 - real / slots,
            "real_tokens_per_step": real / len(maxima), "slots_per_step_fixed": fixed / len(maxima),
            "slots_per_step_bucketed": slots / len(maxima), "slot_ratio": fixed / slots, "steps_per_bucket": hist}


def best_buckets(lengths: np.ndarray, max_length: int, extra: int, batch_size: int, window: int,
                 multiple: int = 128) -> tuple:
    """The `extra` lengths (multiples of `multiple` below max_length) that, with max_length, pad least."""
    maxima = batch_maxima(lengths, batch_size, window)
    grid = range(multiple, max_length, multiple)
    best = min(itertools.combinations(grid, extra), key=lambda c: _bucketed(maxima, (*c, max_length)).sum())
    return (*best, max_length)


def cpu_throughput(lengths: np.ndarray, buckets: tuple, *, batch_size: int, window: int, steps: int,
                   image_positions: int = 144, rounds: int = 4, config: str = "configs/llava15.py:tiny") -> dict:
    """Real (non-pad) tokens/s of the tiny model's train step on this CPU, rows at max(buckets) against buckets.
    Each batch holds `batch_size` samples of the given lengths: the tower's image tokens first, then random text
    (the first `image_positions` unsupervised, as a sample's image tokens would be)."""
    import flax.linen as nn
    import jax

    from uhd_jax.config_loading import load_config
    from uhd_jax.data.batch import BatchShape
    from uhd_jax.parallel.sharding import rules_from_config
    from uhd_jax.models.vlm import VLM
    from uhd_jax.train.trainer import batch_to_device, build_training, model_for_stage, stage_mesh

    c = load_config(config)
    c.mesh.update(data=1, fsdp=1, tensor=1)
    stage = c.stages.sft
    stage.update(batch_size=batch_size, max_length=int(max(buckets)))
    cfg = model_for_stage(c, stage)
    mesh, rules = stage_mesh(c), rules_from_config(c.get("axis_rules"))
    rng = np.random.default_rng(0)
    n_img = cfg.tokens_per_image

    def batch(rows, length):
        a = BatchShape(batch_size, length, 1, cfg.vision.image_size).zeros()
        for r, n in enumerate(rows):
            n = max(int(n), n_img + 2)
            a["input_ids"][r, :n] = rng.integers(1, cfg.llm.vocab_size, n)
            a["targets"][r, :n - 1] = a["input_ids"][r, 1:n]
            a["loss_mask"][r, min(image_positions, n - 2):n - 1] = True
            a["token_valid"][r, :n] = True
            a["positions"][r, :n] = np.arange(n)
            a["segment_ids"][r, :n] = 1
            a["image_token_map"][r, :n_img] = np.arange(n_img)
        a["pixel_values"][:] = rng.standard_normal(a["pixel_values"].shape)
        a["image_valid"][:] = True
        return a

    size = window * batch_size
    runs = []
    for w in range(len(lengths) // size):
        chunk = lengths[w * size:(w + 1) * size]
        runs += [chunk[run] for run in window_batches_order(chunk, batch_size, 0, w)]
    layouts = {"fixed": [batch(lengths[i * batch_size:(i + 1) * batch_size], max(buckets)) for i in range(steps)],
               "bucketed": [batch(runs[i], bucket_of(int(max(runs[i])), buckets)) for i in range(steps)]}
    seconds = dict.fromkeys(layouts, 0.0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        setup = build_training(c, stage, cfg, mesh, rules, 0, 1000)
        step_fn = setup.step_fn(VLM(cfg), tuple(layouts["fixed"][0]), None)
        state = setup.state
        for b in {b["input_ids"].shape[1]: b for bs in layouts.values() for b in bs}.values():   # compile first
            state, m = step_fn(state, batch_to_device(b, 1, mesh))
            jax.block_until_ready(m)
        # Alternating blocks of steps: a load change on a shared machine hits both layouts alike.
        for block in np.array_split(np.arange(steps), rounds):
            for name, batches in layouts.items():
                t0 = time.perf_counter()
                for i in block:
                    state, m = step_fn(state, batch_to_device(batches[i], 1, mesh))
                jax.block_until_ready(m)
                seconds[name] += time.perf_counter() - t0
    out = {"compiles": step_fn._cache_size()}
    for name, batches in layouts.items():
        real = sum(int(b["token_valid"].sum()) for b in batches)
        slots = sum(b["token_valid"].size for b in batches)
        out[name] = {"real_tokens_per_s": real / seconds[name], "steps_per_s": steps / seconds[name],
                     "pad_fraction": 1 - real / slots}
    return out


def stage_lengths(config, stage_name: str, samples: int, seed: int = 0) -> np.ndarray:
    """Token lengths (image tokens included, truncated to the stage's max_length) of up to `samples` samples drawn
    at random from the stage's data, prepared as training prepares them; skipped samples are left out."""
    from uhd_jax.data.dataset import read_samples
    from uhd_jax.train.trainer import model_for_stage, preparer_factory, stage_sources

    stage = config.stages[stage_name]
    factory = preparer_factory(config, stage, model_for_stage(config, stage))
    pool = [(src, i, s) for src in stage_sources(config, stage, stage_name)
            for i, s in enumerate(read_samples(src.json))]
    rng = np.random.default_rng(seed)
    preparers, out = {}, []
    for k in rng.permutation(len(pool))[:samples]:
        src, i, sample = pool[k]
        prep = preparers.setdefault(src, factory(src))
        ex = prep((i, sample, i))
        if "ids" in ex:
            out.append(len(ex["ids"]))
    return np.asarray(out)


def modelled_report(batch: int, window: int, extra: int) -> dict:
    report = {}
    for name, tokens, max_length, mix, k in (("llava15_pretrain", llava15_image_tokens, 2048, LCS558K, 1),
                                             ("llava15_sft", llava15_image_tokens, 2048, MIX665K, extra),
                                             ("uhd_v2_sft", uhd_image_tokens, 4096, MIX665K, extra)):
        lengths = draw_lengths(tokens, max_length=max_length, mix=mix)
        buckets = best_buckets(lengths, max_length, k, batch, window)
        report[name] = {"samples": len(lengths), "median_length": float(np.median(lengths)),
                        "p90_length": float(np.percentile(lengths, 90)),
                        "truncated": int((lengths >= max_length).sum()), **padding(lengths, buckets, batch, window),
                        "by_window": {w: padding(lengths, buckets, batch, w)["pad_bucketed"] for w in (1, 2, 4, 8, 16)}}
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=128, help="samples per step (per process)")
    p.add_argument("--window", type=int, default=8, help="batches sorted together (stage.length_window)")
    p.add_argument("--extra-buckets", type=int, default=3, help="buckets below max_length to choose")
    p.add_argument("--multiple", type=int, default=128, help="buckets are multiples of this")
    p.add_argument("--cpu-steps", type=int, default=0, help="also time this many tiny train steps per layout")
    p.add_argument("--config", default="", help="measure this config's data instead of the model (CONFIG.py:VARIANT)")
    p.add_argument("--stage", default="sft", help="with --config: the stage whose data to measure")
    p.add_argument("--samples", type=int, default=5000, help="with --config: samples to prepare")
    p.add_argument("--out", default="", help="also write the report (JSON) here")
    a = p.parse_args(argv)
    if a.config:
        from uhd_jax.config_loading import load_config

        config = load_config(a.config)
        max_length = int(config.stages[a.stage].max_length)
        lengths = stage_lengths(config, a.stage, a.samples)
        if len(lengths) < a.window * a.batch:
            raise SystemExit(f"{len(lengths)} usable samples: fewer than one window ({a.window} x {a.batch}); "
                             f"raise --samples or lower --batch / --window")
        buckets = best_buckets(lengths, max_length, a.extra_buckets, a.batch, a.window, a.multiple)
        report = {f"{a.config} {a.stage}": {"samples": len(lengths), "median_length": float(np.median(lengths)),
                                            **padding(lengths, buckets, a.batch, a.window)}}
    else:
        report = modelled_report(a.batch, a.window, a.extra_buckets)
    if a.cpu_steps and not a.config:
        # The LLaVA-1.5 SFT mix and its buckets scaled by 1/4 (max_length 512, 144 "image" tokens of which the tiny
        # tower fills the first 16), batch 8 and the same 1024-sample window: a step's cost tracks its length.
        tiny = draw_lengths(lambda s: 144, max_length=512, scale=0.25, seed=1)
        buckets = tuple(b // 4 for b in report["llava15_sft"]["buckets"])
        window = a.window * a.batch // 8
        report["cpu_tiny"] = {"buckets": list(buckets), "window": window,
                              **cpu_throughput(tiny, buckets, batch_size=8, window=window, steps=a.cpu_steps)}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
