"""Pretrain the demo's ViT to read digits and see colours: the demo's stand-in for CLIP's pretraining (issue #19).

The papers' models start from a CLIP that can already see; the demo's towers are random. Without this stage neither
demo model learns to read its one-digit code in the CPU budget (2026-12-02: no setting of depth, rate or epochs took
held-out code accuracy off the 9.5% image-blind floor; README, Quick start). Here the ViT alone learns, on single
card cells (`synthetic_cards.glyph_cell`, drawn at 112-512 px and resized to the ViT's input as a slice is), to name
the digit under each patch, and the cell's digit and background colour from the mean of its patches, through linear
heads on its selected layer (`select_layer`, the features the projector reads). The heads are dropped; both demo
models start from the same ViT and keep it frozen, as LLaVA-1.5 and LLaVA-UHD keep CLIP. Whether a model then reads
a card's code depends on how large its image path shows the digit: ~16 px in a UHD slice of a 448 x 112 card, ~4 px
in LLaVA-1.5's padded 112 px square.

The demo installs the shipped weights (`DEMO_WEIGHTS`, 0.8 MB) instead of spending its budget here; they are this
command's output (2026-12-03, 490 s on 2 idle cores; on 256 held-out cells it printed: digits read per patch 76.4%,
per cell 66.7%, background colours 99.2%):

  python -m uhd_jax.train.glyph_vit --config configs/llava15.py:demo --steps 2500 \
      --out uhd_jax/configs/demo_glyph_vit.npz
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from uhd_jax.cli_errors import load_config, reports_user_errors
from uhd_jax.data.image_processing import normalize
from uhd_jax.data.synthetic_cards import BACKGROUNDS, glyph_cell
from uhd_jax.models.config import vit_config
from uhd_jax.models.vit import VisionTransformer
from uhd_jax.train.param_tree import flatten, unflatten

DEMO_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "demo_glyph_vit.npz")
NO_DIGIT = 10
HELD_OUT_SEED = 1   # training cells come from seed 0
SIDES = (112, 512)  # a cell's drawn side: the demo's slices (448 px cards) up to the reading benchmark's 2048 px
# The colour is learned in a few hundred steps; at full weight its gradients slowed the digits' learning (2500 steps:
# 53.3% of digit patches read against 74.4% without the head).
COLOUR_WEIGHT = 0.1


class GlyphReader(nn.Module):
    """The ViT with two 11-way heads (ten digits, none), per patch and on the mean of the cell's patch features, and
    a 4-way background-colour head on that mean. The pooled heads make the digit and the colour survive pooling,
    as a projector that compresses windows of patches into a few tokens (LLaVA-UHD v2's HiWin) needs: CLIP sees
    colours, and a reader trained on digits alone encoded the card's colour too weakly for HiWin's linear pooling to
    keep it (README, Quick start). Returns (per-patch logits (N, P, 11), cell logits (N, 11), colour logits (N, 4))."""
    vision: object

    @nn.compact
    def __call__(self, pixels):
        features = VisionTransformer(self.vision, name="vision")(pixels)
        pooled = features.mean(axis=1)
        return (nn.Dense(NO_DIGIT + 1, name="head")(features), nn.Dense(NO_DIGIT + 1, name="cell_head")(pooled),
                nn.Dense(len(BACKGROUNDS), name="colour_head")(pooled))


def cells(seed: int, indices, size: int, patch: int):
    """(pixels (N, size, size, 3) CLIP-normalised, (digit labels (N, patches), background colours (N,))) of cells
    `indices` of stream `seed`."""
    sides = np.random.default_rng([seed, 2]).integers(SIDES[0], SIDES[1] + 1, size=max(indices) + 1)
    drawn = [glyph_cell(seed, int(i), int(sides[i]), size, patch) for i in indices]
    return (np.stack([normalize(img) for img, _, _ in drawn]),
            (np.stack([lab for _, lab, _ in drawn]), np.array([bg for _, _, bg in drawn], np.int32)))


def cell_labels(labels):
    """The cell's digit (10: none) from its per-patch labels."""
    return labels.min(axis=-1)


def balanced_loss(outputs, targets):
    """Mean cross-entropy over digit patches, plus that over the rest (a digit covers ~2 of 64 patches), plus the
    cell head's and the colour head's."""
    (patch_logits, cell_logits, colour_logits), (labels, backgrounds) = outputs, targets
    ce = optax.softmax_cross_entropy_with_integer_labels(patch_logits, labels)
    digit = labels < NO_DIGIT
    return (jnp.sum(ce * digit) / jnp.maximum(digit.sum(), 1)
            + jnp.sum(ce * ~digit) / jnp.maximum((~digit).sum(), 1)
            + optax.softmax_cross_entropy_with_integer_labels(cell_logits, cell_labels(labels)).mean()
            + COLOUR_WEIGHT * optax.softmax_cross_entropy_with_integer_labels(colour_logits, backgrounds).mean())


def reader_accuracy(predicted, targets) -> tuple[float, float, float]:
    """(share of digit patches whose digit the patch head names, share of cells with a digit whose digit the cell
    head names, share of cells whose background the colour head names); `predicted`: the heads' argmaxes."""
    (patches, cells_, colours), (labels, backgrounds) = predicted, targets
    digit = labels < NO_DIGIT
    cell = cell_labels(labels)
    has = cell < NO_DIGIT
    return (float((patches[digit] == labels[digit]).mean()), float((cells_[has] == cell[has]).mean()),
            float((colours == backgrounds).mean()))


def _predictor(model: GlyphReader):
    """Jitted (params, pixels) -> the heads' argmaxes (per patch, per cell, colour)."""
    return jax.jit(lambda p, x: tuple(o.argmax(-1) for o in model.apply({"params": p}, x)))


def pretrain(model_config, steps: int, batch: int = 64, lr: float = 2e-3, seed: int = 0, n_eval: int = 256,
             log=print):
    """Train the ViT of `model_config` (a config.model dict) with the three heads; returns (the reader's parameters
    as numpy, {'vision', 'head', 'cell_head', 'colour_head'}, and its held-out accuracies, `reader_accuracy`)."""
    vision = vit_config(model_config)
    size, patch = vision.image_size, vision.patch_size
    model = GlyphReader(vision)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, size, size, 3)))["params"])
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, min(50, steps // 10), steps), weight_decay=0.0)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: balanced_loss(model.apply({"params": p}, x), y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    predict = _predictor(model)
    held_x, held_y = cells(HELD_OUT_SEED, range(n_eval), size, patch)
    order = np.random.default_rng([seed, 3]).permutation(steps * batch)   # every training cell is new
    t0 = time.perf_counter()
    for t in range(steps):
        x, y = cells(seed, order[t * batch:(t + 1) * batch], size, patch)
        params, opt_state, loss = step(params, opt_state, x, y)
        if (t + 1) % 250 == 0 or t + 1 == steps:   # the last step's accuracies are the ones returned
            acc = reader_accuracy(jax.device_get(predict(params, held_x)), held_y)
            log(f"step {t + 1}/{steps}: loss {float(loss):.3f}, held-out {describe(acc)} "
                f"({time.perf_counter() - t0:.0f}s)")
    return jax.tree.map(np.asarray, params), acc


def describe(acc) -> str:
    """`reader_accuracy`'s three shares, as the log and the CLI print them."""
    return (f"digits read per patch {100 * acc[0]:.1f}%, per cell {100 * acc[1]:.1f}%, background colours "
            f"{100 * acc[2]:.1f}%")


def read_cells(model_config, weights: dict, pixels):
    """(per patch (N, patches), per cell (N,), colour (N,)) predictions of a reader `weights` on CLIP-normalised
    `pixels`."""
    return jax.device_get(_predictor(GlyphReader(vit_config(model_config)))(weights, pixels))


def load_reader(weights: str) -> dict:
    """The reader's parameters ({'vision', 'head', 'cell_head'}) from this module's .npz."""
    with np.load(weights) as f:
        return unflatten({k: f[k] for k in f.files})


def install(weights: str, out: str, model_config: dict) -> str:
    """Write the ViT of `weights` (.npz, this module's output; its head is dropped) as a uhd-jax checkpoint `out`
    holding only `vision/...`, for a stage's `init_checkpoints`; its shapes are checked against `model_config`'s."""
    from uhd_jax.train.checkpoints import save_params

    vision_params = load_reader(weights)["vision"]
    vision = vit_config(model_config)
    size = vision.image_size
    abstract = nn.meta.unbox(jax.eval_shape(VisionTransformer(vision).init, jax.random.PRNGKey(0),
                                            jnp.zeros((1, size, size, 3)))["params"])
    got = {k: v.shape for k, v in flatten(vision_params).items()}
    want = {k: v.shape for k, v in flatten(abstract).items()}
    if got != want:
        wrong = sorted(set(got.items()) ^ set(want.items()))[:4]
        raise ValueError(f"{weights} does not hold this config's ViT (differences: {wrong}); regenerate it with "
                         f"`python -m uhd_jax.train.glyph_vit --config ... --out {weights}`")
    save_params(out, {"vision": vision_params}, {"model": dict(model_config), "stage": "glyph_vit",
                                                "source": os.path.abspath(weights)})
    return out


@reports_user_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/llava15.py:demo", help="the config whose ViT is pretrained")
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="the .npz to write")
    a = p.parse_args(argv)
    if a.steps < 1 or a.batch < 1:
        p.error(f"--steps {a.steps} --batch {a.batch}: give positive numbers")
    config = load_config(a.config)   # a path, or a config shipped with the package
    reader, acc = pretrain(config.model.to_dict(), a.steps, a.batch, a.lr, a.seed)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    np.savez(a.out, **flatten(reader))
    print(f"wrote {a.out}: held-out {describe(acc)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
