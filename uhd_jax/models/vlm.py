"""The vision-language model: ViT -> projector -> features written into the LLM's input embeddings.

Batch schema (static shapes; built on the host, see `uhd_jax.data`):
  input_ids        (B, L) int32   text ids; image slots hold any id (their embedding is replaced)
  token_valid      (B, L) bool    real tokens (False = padding)
  positions        (B, L) int32   RoPE positions (0..n-1 over real tokens)
  pixel_values     (B, I, H, W, 3) float32  normalised images, I = image slots per sample (fixed)
  image_token_map  (B, L) int32   for each LLM position, the row of this sample's flattened image features
                                  (I * tokens_per_image rows, image-major) to write there, or -1 for text

LLaVA-1.5 and LLaVAR are configurations of this model: LLaVAR's `<im_start>`/`<im_end>` are ordinary text tokens
placed by the tokenizer around the 576 image slots. Text-only samples carry a zero image whose features no position
references.

SliME (`projector_type='gated'`) reads I = max_images x views_per_image square views (each image's global view, then
its tiles) and lays every image's features out in `SlimeConfig.rows_per_image` rows; its router drops local tokens by
turning their positions invalid: the LLM moves the kept tokens together before attending (causal, with lengths) and
positions are recounted over them, which gives every kept token exactly what the original's shorter, packed sequence
gives it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from uhd_jax.models.llama import KVCache, Llama, LlamaConfig, positions_from_mask
from uhd_jax.models.projectors import RESAMPLER_TYPES, build_projector
from uhd_jax.models.projectors.resampler import ResamplerGeometry
from uhd_jax.models.projectors.slime import SlimeConfig, SlimeProjector
from uhd_jax.models.vit import PackedPatches, ViTConfig, VisionTransformer


@dataclasses.dataclass(frozen=True)
class VLMConfig:
    vision: ViTConfig
    llm: LlamaConfig
    projector_type: str = "mlp2x_gelu"
    vision_trainable: bool = False  # frozen tower: no gradient flows into (or through) it
    resampler_heads: int = 0        # resamplers: attention heads (0 = LLM hidden // 128, at least 1)
    feature_scale_mask: int = 5     # v2 HiWin levels: bits 1 -> 1x, 2 -> 2x, 4 -> 4x (released: 5)
    slime: SlimeConfig | None = None  # projector_type 'gated' (SliME)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def packed_images(self) -> bool:
        """UHD projectors read variable-size slices packed into rows; the others take fixed square images."""
        return self.projector_type in RESAMPLER_TYPES

    def __post_init__(self):
        if (self.projector_type == "gated") != (self.slime is not None):
            raise ValueError("projector_type 'gated' (SliME) and the model.slime section go together")

    @property
    def views_per_image(self) -> int:
        """Square image slots one image takes (SliME: its global view and tiles; everyone else: 1)."""
        return self.slime.views_per_image if self.slime is not None else 1

    @property
    def stochastic_training(self) -> bool:
        """The model draws random numbers in training (JBU dropout, SliME's gate and router noise, LoRA dropout)."""
        lora_dropout = self.llm.lora is not None and self.llm.lora.dropout > 0
        return bool(RESAMPLER_TYPES.get(self.projector_type, {}).get("jbu")) or self.slime is not None or lora_dropout

    @property
    def tokens_per_image(self) -> int:
        """Feature rows per image (the image_token_map's row space)."""
        if self.slime is not None:
            return self.slime.rows_per_image
        if self.packed_images:
            return RESAMPLER_TYPES[self.projector_type]["grid"] ** 2
        n = self.vision.grid ** 2
        return n + 1 if self.vision.select_feature == "cls_patch" else n


def view_is_read(rows_used, c: SlimeConfig):
    """(B, I, R) feature rows some position reads -> (B, I, V) the views they come from (global view, then tiles)."""
    glob = jnp.any(rows_used[..., :c.global_grid ** 2], axis=-1, keepdims=True)
    if c.views == "global":
        return glob
    tiles = rows_used[..., c.local_offset:].reshape(*rows_used.shape[:2], c.max_tiles, c.local_grid ** 2)
    return jnp.concatenate([glob, jnp.any(tiles, axis=-1)], axis=-1)


def _check_view_budget(read, *, budget: int, per_sample: float):
    if int(read) > budget:
        raise ValueError(f"this SliME batch has {int(read)} views to encode, more than its budget of {budget} "
                         f"(model.slime.views_per_sample={per_sample}): raise it (0: every slot)")


def splice_image_features(text_embeds, image_features, image_token_map):
    """Write image feature rows into the text embedding sequence where `image_token_map >= 0` (one gather)."""
    rows = jnp.take_along_axis(image_features, jnp.maximum(image_token_map, 0)[..., None], axis=1)
    return jnp.where((image_token_map >= 0)[..., None], rows.astype(text_embeds.dtype), text_embeds)


class VLM(nn.Module):
    cfg: VLMConfig

    def setup(self):
        c = self.cfg
        self.vision = VisionTransformer(c.vision, name="vision")
        if c.slime is not None:
            self.projector = SlimeProjector(c.slime, c.llm.hidden_size, c.dtype, c.param_dtype, name="projector")
        else:
            self.projector = build_projector(c.projector_type, c.llm.hidden_size, c.dtype, c.param_dtype,
                                             heads=c.resampler_heads, feature_scale_mask=c.feature_scale_mask)
        self.llm = Llama(c.llm, name="llm")

    def encode_images(self, pixel_values, deterministic: bool = True):
        """(B, I, H, W, 3), or the packed dict of `uhd_jax.data.uhd_images` -> features (B, I * tokens, H_llm)."""
        if self.cfg.packed_images:
            return self.encode_packed_images(pixel_values, deterministic)
        b, i = pixel_values.shape[:2]
        feats = self.vision(pixel_values.reshape(b * i, *pixel_values.shape[2:]))
        if not self.cfg.vision_trainable:
            feats = jax.lax.stop_gradient(feats)
        feats = self.projector(feats.astype(self.cfg.dtype))
        return feats.reshape(b, i * feats.shape[1], feats.shape[-1])

    def encode_packed_images(self, images: dict, deterministic: bool = True):
        """Slices and overviews of any sizes, packed into rows of the patch budget -> (B, I * grid^2, H_llm)."""
        packed = PackedPatches(images["patches"], images["patch_segment_ids"], images["patch_is_cls"],
                               images["patch_pos_index"], images["patch_pos_weight"], images["image_valid"])
        feats = self.vision.encode_packed(packed)
        if not self.cfg.vision_trainable:
            feats = jax.lax.stop_gradient(feats)
        feats = feats.astype(self.cfg.dtype)
        if RESAMPLER_TYPES[self.cfg.projector_type].get("jbu"):
            out = self.projector(feats, images, deterministic)  # the JBU's dropout is live in training
        else:
            out = self.projector(feats, ResamplerGeometry(
                images["key_pos_index"], images["key_pos_weight"], images["roi_index"], images["roi_weight"],
                images["key_valid"], images["image_valid"], images["patch_segment_ids"], images["patch_is_cls"]))
        return out.reshape(out.shape[0], -1, out.shape[-1])  # (B, I, grid^2, H) -> (B, I * grid^2, H)

    def encode_slime(self, token_valid, pixel_values, image_token_map, text, deterministic: bool):
        """SliME: (features (B, I * R, H), keep (B, I * R)); see `SlimeProjector`.

        Only the views whose features some position reads (an image's global view, the tiles its grid has) go through
        the vision tower, gathered into `SlimeConfig.view_budget` rows; the other slots get zero features, which no
        position reads and which no read row depends on (every branch works per view)."""
        c = self.cfg.slime
        b, n = pixel_values.shape[:2]
        n_img = n // c.views_per_image
        views = pixel_values.reshape(b, n_img, c.views_per_image, *pixel_values.shape[2:])
        rows = jnp.maximum(image_token_map, 0)
        rows_used = jnp.zeros((b, n_img * c.rows_per_image), bool).at[jnp.arange(b)[:, None], rows].max(
            image_token_map >= 0)
        read = view_is_read(rows_used.reshape(b, n_img, c.rows_per_image), c)   # (B, I, V)
        if c.views == "local":   # run 1c never reads the global view: keep it out of the vision tower
            views, read = views[:, :, 1:], read[:, :, 1:]
        slots = views.shape[0] * views.shape[1] * views.shape[2]
        flat = views.reshape(slots, *views.shape[3:])
        budget = c.view_budget(slots, b)
        if budget < slots:
            chosen = jnp.argsort(~read.reshape(-1), stable=True)[:budget]   # the read views first, in order
            jax.debug.callback(_check_view_budget, jnp.sum(read), budget=budget, per_sample=c.views_per_sample)
            encoded = self.vision(flat[chosen])
            feats = jnp.zeros((slots, *encoded.shape[1:]), encoded.dtype).at[chosen].set(encoded)
        else:
            feats = self.vision(flat)
        if not self.cfg.vision_trainable:
            feats = jax.lax.stop_gradient(feats)
        feats = feats.astype(self.cfg.dtype).reshape(*views.shape[:3], *feats.shape[1:])
        if c.views == "local":
            feats = jnp.concatenate([jnp.zeros_like(feats[:, :, :1]), feats], axis=2)
        separator = self.llm.embed(jnp.asarray(c.separator_id, jnp.int32))
        return self.projector(feats, separator, text, token_valid & (image_token_map < 0), rows_used, deterministic)

    def embed_image_and_text(self, input_ids, token_valid, positions, pixel_values, image_token_map,
                             deterministic: bool = True):
        """-> (inputs_embeds, token_valid, positions) for the LLM. Only SliME changes the last two (routed-out image
        tokens become invalid, positions are recounted over the valid tokens)."""
        text = self.llm.embed(input_ids)
        if self.cfg.slime is None:
            feats = self.encode_images(pixel_values, deterministic)
            return splice_image_features(text, feats, image_token_map), token_valid, positions
        feats, keep = self.encode_slime(token_valid, pixel_values, image_token_map, text, deterministic)
        kept = jnp.take_along_axis(keep, jnp.maximum(image_token_map, 0), axis=1) | (image_token_map < 0)
        token_valid = token_valid & kept
        return splice_image_features(text, feats, image_token_map), token_valid, positions_from_mask(token_valid)

    def __call__(self, input_ids, token_valid, positions, pixel_values, image_token_map,
                 cache: KVCache | None = None, return_hidden: bool = False, deterministic: bool = True):
        """`deterministic=False` (training) enables the projector's randomness (LLaVA-UHD v2's JBU dropout, SliME's
        gate and router noise) and needs a 'dropout' rng."""
        embeds, token_valid, positions = self.embed_image_and_text(input_ids, token_valid, positions, pixel_values,
                                                                   image_token_map, deterministic)
        return self.llm(embeds, positions, token_valid, cache=cache, return_hidden=return_hidden)

    def decode(self, input_ids, token_valid, positions, cache: KVCache):
        """Text-only continuation (generation steps after the prefill)."""
        return self.llm(self.llm.embed(input_ids), positions, token_valid, cache=cache)


def example_inputs(cfg: VLMConfig, batch: int = 1, seq_len: int = 8, images: int = 1):
    """Smallest well-formed inputs for `init` / `eval_shape` (shapes only matter)."""
    size = cfg.vision.image_size
    images *= cfg.views_per_image
    if cfg.packed_images:
        from uhd_jax.data.uhd_images import layout_for_model  # host-side layout of the packed inputs

        layout = layout_for_model(cfg, patch_budget=1 + cfg.vision.grid ** 2, max_images=images, roi_taps=1,
                                  level_roi_taps=1)
        pixels = {k: jnp.asarray(v) for k, v in layout.zeros(batch).items()}
    else:
        pixels = jnp.zeros((batch, images, size, size, 3), jnp.float32)
    return (jnp.zeros((batch, seq_len), jnp.int32), jnp.ones((batch, seq_len), bool),
            jnp.zeros((batch, seq_len), jnp.int32), pixels, jnp.full((batch, seq_len), -1, jnp.int32))


def init_fn(cfg: VLMConfig):
    """`rng -> boxed variables` of the whole VLM; wrap with `jax.eval_shape` or `parallel.sharding.init_sharded`."""
    model = VLM(cfg)
    return lambda rng: model.init(rng, *example_inputs(cfg))
