"""Model FLOPs of a train step or a forward pass, by written formula, for MFU.

Forward FLOPs per component (multiply-add = 2 FLOPs):
  ViT, per image of n = patches + 1 tokens, over the layers it computes (up to `select_layer`):
      2 n P^2 C W (patch embedding) + layers x [2 n (4 W^2 + 2 W M) + 4 n^2 W]
  LLM, per sequence of T positions (all T are computed, padding included):
      2 T N_mm + layers x 4 T^2 H D        N_mm = matmul weights (q, k, v, o, gate, up, down, lm_head)
  The attention terms count the full T x T (n x n) score and value products, as the masked kernels compute them
      and as PaLM's MFU formula does (12 L H Q T per token for training); packed UHD rows count each image's own
      n^2, which is also what the packed tower computes (`vit.attend_per_image`: each image's keys in a row of
      its own, up to the per-image budget; no scores between images).
  Projector: its forward FLOPs as XLA's cost analysis counts them on the projector alone (`projector_flops`): the
      projectors are small (< 3% of a 7B step) and many-shaped (RoIAlign taps, JBU, windows, SliME's branches).

Training multiplies each component's forward count (2N per token for N weights) by what the step does with it:
  3x  its weights train: forward, gradient of the inputs, gradient of the weights (the "6N" rule)
  2x  frozen, but the gradient passes through to trained parts before it (a frozen LLM under a trained projector: 4N)
  1x  frozen and nothing before it trains (a frozen ViT): forward only (2N)
Recomputation from remat is not model work and never counts. `xla_flops` reads XLA's own count of a lowered program
for the cross-check (it includes elementwise work, remat recomputation and masked attention, so it runs higher; and
it counts the body of a loop once, so a model with `scan_layers` must be lowered unrolled to be compared).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax


@dataclasses.dataclass(frozen=True)
class StepFlops:
    vision: float
    projector: float
    llm: float
    multipliers: tuple[float, float, float]   # vision, projector, llm

    @property
    def forward(self) -> float:
        return self.vision + self.projector + self.llm

    @property
    def train(self) -> float:
        mv, mp, ml = self.multipliers
        return mv * self.vision + mp * self.projector + ml * self.llm


def vit_forward_flops(vcfg, tokens_per_image: Sequence[int]) -> float:
    """tokens_per_image: n = patches + 1 (CLS) of each image the tower encodes."""
    w, m, p, c = vcfg.hidden_size, vcfg.intermediate_size, vcfg.patch_size, vcfg.num_channels
    layers = vcfg.num_computed_layers
    total = 0.0
    for n in tokens_per_image:
        total += 2.0 * (n - 1) * p * p * c * w + layers * (2.0 * n * (4 * w * w + 2 * w * m) + 4.0 * n * n * w)
    return total


def llm_matmul_params(lcfg) -> int:
    e, d = lcfg.hidden_size, lcfg.dim_per_head
    per_layer = e * d * (2 * lcfg.num_heads + 2 * lcfg.num_kv_heads) + 3 * e * lcfg.intermediate_size
    return lcfg.num_layers * per_layer + e * lcfg.vocab_size


def llm_forward_flops(lcfg, seq_len: int, batch: int = 1) -> float:
    t = seq_len
    attention = lcfg.num_layers * 4.0 * t * t * lcfg.num_heads * lcfg.dim_per_head
    return batch * (2.0 * t * llm_matmul_params(lcfg) + attention)


def multipliers(vision_trains: bool, projector_trains: bool, llm_trains: bool) -> tuple[float, float, float]:
    """Per-component training multipliers of the forward count (see the module docstring); a frozen component
    passes gradients (2x) only if something before it trains."""
    vision = 3.0 if vision_trains else 1.0
    projector = 3.0 if projector_trains else (2.0 if vision_trains else 1.0)
    llm = 3.0 if llm_trains else (2.0 if (vision_trains or projector_trains) else 1.0)
    return vision, projector, llm


def xla_flops(lowered) -> float:
    """XLA's FLOP count of a lowered (not yet compiled) program, or nan where the backend gives none."""
    cost = lowered.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def projector_flops(vlm_cfg, batch: dict) -> float:
    """Forward FLOPs of the VLM's projector for one batch (the step's arrays without the accumulation axis), as XLA
    counts them: image encoding and splicing minus the vision tower alone (text embedding and splicing are gathers)."""
    from uhd_jax.models.vlm import VLM
    from uhd_jax.train.step import model_inputs

    model, params, abstract = _abstract(vlm_cfg, batch)

    def encode(p, arrays):
        return model.apply(p, *model_inputs(arrays), method=VLM.embed_image_and_text)[0]

    both = xla_flops(jax.jit(encode).lower(params, abstract))
    return max(both - vision_xla_flops(vlm_cfg, batch), 0.0)


def _abstract(vlm_cfg, batch: dict):
    from uhd_jax.models.vlm import VLM, init_fn

    params = jax.eval_shape(init_fn(vlm_cfg), jax.random.PRNGKey(0))
    return VLM(vlm_cfg), params, {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}


def vision_xla_flops(vlm_cfg, batch: dict) -> float:
    """XLA's count of the vision tower alone on one batch's images (UHD: the packed rows, every slot computed;
    fixed-size images: every image slot), to set beside `vit_forward_flops` of the real images. The per-token layers
    run on padding slots too: cut the rows to their bucket first (`uhd_images.fit_to_bucket`, as generation packs
    them) to count what inference computes; a 672x1088 image in CLIP-L counts 1.07x its formula at 4039 slots,
    1.21x at the full 4616."""
    from uhd_jax.models.vit import PackedPatches
    from uhd_jax.train.step import model_inputs

    model, params, abstract = _abstract(vlm_cfg, batch)

    def tower(p, arrays):
        images = model_inputs(arrays)[3]
        if vlm_cfg.packed_images:
            packed = PackedPatches(images["patches"], images["patch_segment_ids"], images["patch_is_cls"],
                                   images["patch_pos_index"], images["patch_pos_weight"], images["image_valid"])
            return model.apply(p, packed, method=lambda m, q: m.vision.encode_packed(q))
        flat = images.reshape(-1, *images.shape[2:])
        return model.apply(p, flat, method=lambda m, q: m.vision(q))

    return xla_flops(jax.jit(tower).lower(params, abstract))
