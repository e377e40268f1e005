"""Benchmark workloads: samples of a given image-size mix whose text fills the sequence budget, prepared by the
real data path (slicing, packing, spatial schema) so a benchmark step does exactly what a training step does.

Images are synthetic text-rich pictures (`uhd_jax.data.synthetic`) resized to each requested size; the text is
random words from a tokenizer trained on the synthetic corpus (at most `vocab_size` ids, to fit the model).
"""
from __future__ import annotations

import json
import os

import numpy as np

from uhd_jax.data import synthetic
from uhd_jax.data.batch import BatchShape, collate
from uhd_jax.data.pipeline import Source


def parse_sizes(spec: str) -> list[tuple[int, int]]:
    """'672x1088,1920x1080' -> [(672, 1088), (1920, 1080)] as (width, height)."""
    out = []
    for item in spec.split(","):
        w, _, h = item.strip().lower().partition("x")
        if not (w.isdigit() and h.isdigit()):
            raise ValueError(f"image size {item!r}: expected WIDTHxHEIGHT, e.g. 672x1088")
        out.append((int(w), int(h)))
    return out


def write_workload(root: str, sizes: list[tuple[int, int]], n_samples: int, words_per_sample: int,
                   seed: int = 0, vocab_size: int = 512) -> dict:
    """Images cycling through `sizes`, one long conversation each, and a tokenizer; cached under `root`."""
    paths = {"json": os.path.join(root, "samples.json"), "images": os.path.join(root, "images"),
             "tokenizer": os.path.join(root, "tokenizer")}
    key = {"sizes": sizes, "n": n_samples, "words": words_per_sample, "seed": seed, "vocab": vocab_size}
    stamp = os.path.join(root, "workload.json")
    if os.path.exists(stamp) and json.load(open(stamp)) == json.loads(json.dumps(key)):
        return paths
    os.makedirs(paths["images"], exist_ok=True)
    rng = np.random.default_rng(seed)
    words = list(synthetic.WORDS) + list(synthetic.ITEMS) + list(synthetic.FILLER)
    samples = []
    for i in range(n_samples):
        w, h = sizes[i % len(sizes)]
        img = synthetic.render(seed, i, min_side=max(w, h), max_side=max(w, h))[0].resize((w, h))
        name = f"{i:05d}_{w}x{h}.png"
        img.save(os.path.join(paths["images"], name))
        text = " ".join(rng.choice(words, size=words_per_sample))
        samples.append({"id": f"bench-{i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nRead all the text in the image."},
            {"from": "gpt", "value": text}]})
    with open(paths["json"], "w") as f:
        json.dump(samples, f)
    from uhd_jax.data.templates import TEMPLATES

    texts = [s["conversations"][1]["value"] for s in samples] + ["Read all the text in the image.", "USER: ASSISTANT:"]
    synthetic.build_tokenizer(texts + [t.system for t in TEMPLATES.values()], paths["tokenizer"],
                              vocab_size=vocab_size)
    with open(stamp, "w") as f:
        json.dump(key, f)
    return paths


def prepared_batches(config, stage, cfg, paths: dict, batch: int, n_batches: int) -> tuple[list[dict], BatchShape]:
    """`n_batches` collated batches (host arrays) of the workload through the stage's own preparer."""
    from uhd_jax.data.dataset import read_samples
    from uhd_jax.train.trainer import packed_layout, preparer_factory

    shape = BatchShape(batch, stage.max_length, config.data.max_images * cfg.views_per_image, cfg.vision.image_size,
                       packed_layout(config, cfg, stage))
    prep = preparer_factory(config, stage, cfg)(Source(paths["json"], paths["images"]))
    samples = read_samples(paths["json"])
    examples = []
    for i, s in enumerate(samples):
        ex = prep((i, s))
        if "skip" in ex:
            raise ValueError(f"benchmark sample {ex['id']} does not fit the stage: {ex['skip']}")
        examples.append(ex)
    need = batch * n_batches
    if len(examples) < need:
        examples = (examples * (need // len(examples) + 1))[:need]
    return [collate(examples[k * batch:(k + 1) * batch], shape) for k in range(n_batches)], shape
