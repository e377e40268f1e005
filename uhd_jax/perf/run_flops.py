"""Model FLOPs of a whole training run, stage by stage (`uhd_jax.perf.flops` per step x the stage's steps).

A stage's step is measured on one global batch of its own first samples, prepared exactly as training prepares them:
every step of a stage has the same static shapes (rows padded to `max_length`, UHD rows to the patch budget), so
only the vision tower's count depends on the images, and the demo's images all cut the same way. The count follows
`flops.StepFlops`: 6N per token for trained weights, the projector as XLA counts it.
"""
from __future__ import annotations

from uhd_jax.data.batch import BatchShape, collate
from uhd_jax.data.dataset import read_samples
from uhd_jax.perf import flops
import jax

from uhd_jax.models.vlm import init_fn
from uhd_jax.train import optimizer as opt
from uhd_jax.train.trainer import model_for_stage, packed_layout, preparer_factory, stage_sources, stage_steps


def trained_parts(cfg, stage) -> dict:
    """{'vision'|'projector'|'llm': whether any of its parameters trains under the stage's rules}."""
    params = jax.eval_shape(init_fn(cfg), jax.random.PRNGKey(0))["params"]
    labels = jax.tree_util.tree_flatten_with_path(opt.group_labels(params, stage.trainable))[0]
    return {part: any(opt.path_str(path).startswith(part + "/") and g != opt.FROZEN for path, g in labels)
            for part in ("vision", "projector", "llm")}


def step_flops(config, stage) -> flops.StepFlops:
    """Model FLOPs of one training step of `stage` (its global batch)."""
    cfg = model_for_stage(config, stage)
    batch = int(stage.batch_size)
    shape = BatchShape(batch, stage.max_length, config.data.max_images * cfg.views_per_image, cfg.vision.image_size,
                       packed_layout(config, cfg, stage))
    source = stage_sources(config, stage)[0]
    prep = preparer_factory(config, stage, cfg)(source)
    examples = []
    for i, sample in enumerate(read_samples(source.json)):
        ex = prep((i, sample))
        if "skip" not in ex:
            examples.append(ex)
        if len(examples) == batch:
            break
    arrays = collate(examples, shape)
    if cfg.packed_images:
        seg = arrays["patch_segment_ids"]
        per_image = [int((row == k).sum()) for row in seg for k in range(1, int(row.max()) + 1)]
    else:
        per_image = [cfg.vision.grid ** 2 + 1] * int(arrays["image_valid"].sum())
    trains = trained_parts(cfg, stage)
    return flops.StepFlops(vision=flops.vit_forward_flops(cfg.vision, per_image),
                           projector=flops.projector_flops(cfg, arrays),
                           llm=flops.llm_forward_flops(cfg.llm, int(stage.max_length), batch),
                           multipliers=flops.multipliers(trains["vision"], trains["projector"], trains["llm"]))


def training_flops(config) -> dict:
    """{stage: (steps, training FLOPs of the stage)} over `config.stage_order`."""
    out = {}
    for name in config.stage_order:
        stage = config.stages[name]
        n = sum(len(read_samples(s.json)) for s in stage_sources(config, stage))
        steps = stage_steps(stage, n)
        out[name] = (steps, steps * step_flops(config, stage).train)
    return out
