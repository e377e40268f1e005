"""The static batch schema shared by every model family, and collation of prepared examples into it.

Arrays (B = per-process batch, L = max_length, I = image slots per sample):
  input_ids       (B, L) int32   text ids; image slots hold `slot_id` (their embedding is replaced)
  targets         (B, L) int32   the token to predict at each position (input_ids shifted left by one)
  loss_mask       (B, L) bool    position's target is supervised (template's learned spans, not padding)
  token_valid     (B, L) bool    real token (sequences are right-padded)
  positions       (B, L) int32   0..n-1 over real tokens, 0 at padding
  segment_ids     (B, L) int32   1 for real tokens, 0 for padding (room for packing several samples per row)
  pixel_values    (B, I, H, W, 3) float32 normalised images, zeros in unused slots
  image_valid     (B, I) bool
  image_token_map (B, L) int32   row of this sample's flattened image features (image-major, tokens_per_image
                                 rows per image) written at each position, -1 for text
UHD models (`BatchShape.packed` set) carry, instead of `pixel_values`/`image_valid`, the slices and overviews packed
into a patch budget per sample and the resampler geometry: see `uhd_jax.data.uhd_images.PackedLayout.zeros`.
Host-only metadata travels beside the arrays: sample ids, skipped samples with reasons, truncation count, epoch.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from uhd_jax.data.uhd_images import PackedLayout, fill_row

TEXT_KEYS = ("input_ids", "targets", "loss_mask", "token_valid", "positions", "segment_ids", "image_token_map")
ARRAY_KEYS = ("input_ids", "targets", "loss_mask", "token_valid", "positions", "segment_ids", "pixel_values",
              "image_valid", "image_token_map")


@dataclasses.dataclass(frozen=True)
class BatchShape:
    batch_size: int
    max_length: int
    max_images: int
    image_size: int
    packed: PackedLayout | None = None

    @property
    def array_keys(self) -> tuple[str, ...]:
        if self.packed is None:
            return ARRAY_KEYS
        return TEXT_KEYS + tuple(self.packed.zeros(1))

    def zeros(self) -> dict:
        b, l, i, s = self.batch_size, self.max_length, self.max_images, self.image_size
        text = {
            "input_ids": np.zeros((b, l), np.int32), "targets": np.zeros((b, l), np.int32),
            "loss_mask": np.zeros((b, l), bool), "token_valid": np.zeros((b, l), bool),
            "positions": np.zeros((b, l), np.int32), "segment_ids": np.zeros((b, l), np.int32),
            "image_token_map": np.full((b, l), -1, np.int32),
        }
        if self.packed is not None:
            return text | self.packed.zeros(b)
        return text | {"pixel_values": np.zeros((b, i, s, s, 3), np.float32), "image_valid": np.zeros((b, i), bool)}


def collate(examples: list[dict], shape: BatchShape) -> dict:
    """Prepared examples (see `dataset.SamplePreparer`) -> the arrays above. len(examples) == shape.batch_size."""
    out = shape.zeros()
    for row, ex in enumerate(examples):
        n = len(ex["ids"])
        out["input_ids"][row, :n] = ex["ids"]
        out["targets"][row, :n - 1] = ex["ids"][1:]
        out["loss_mask"][row, :n - 1] = ex["learned"][1:]
        out["token_valid"][row, :n] = True
        out["positions"][row, :n] = np.arange(n)
        out["segment_ids"][row, :n] = 1
        out["image_token_map"][row, :n] = ex["image_map"]
        k = len(ex["pixels"])
        if shape.packed is not None:
            fill_row(out, row, list(ex["pixels"]), shape.packed)
        elif k:
            out["pixel_values"][row, :k] = ex["pixels"]
            out["image_valid"][row, :k] = ex.get("pixel_valid", True)   # SliME: tile slots past its grid are not
    return out
