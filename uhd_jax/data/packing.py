"""Host-side packing of variable-size images into the fixed token budget of `ViT.encode_packed`.

Budget rule: a row holds its images back to back, each taking 1 (CLS) + h*w slots; a row whose images do not fit is
an error here, and the batching layer moves that sample to the next batch instead of truncating it.
"""
from __future__ import annotations

import numpy as np

from uhd_jax.models.interpolate import position_taps
from uhd_jax.models.vit import PackedPatches


def pack_images_for_vit(images: list[list[np.ndarray]], budget: int, patch: int, grid: int) -> PackedPatches:
    """Host-side packing of normalised (H, W, C) images, one list per row, into a fixed budget of N token slots.

    Raises ValueError naming the row if its images need more than `budget` slots (a caller moves the sample on).
    """
    b = len(images)
    channels = images[0][0].shape[-1] if images and images[0] else 3
    patches = np.zeros((b, budget, patch, patch, channels), np.float32)
    segment_ids = np.zeros((b, budget), np.int32)
    is_cls = np.zeros((b, budget), bool)
    pos_index = np.zeros((b, budget, 16), np.int32)
    pos_weight = np.zeros((b, budget, 16), np.float32)
    for row, row_images in enumerate(images):
        offset = 0
        for k, img in enumerate(row_images, start=1):
            hh, ww = img.shape[:2]
            if hh % patch or ww % patch:
                raise ValueError(f"row {row} image {k}: size {hh}x{ww} is not a multiple of the patch size {patch}")
            h, w = hh // patch, ww // patch
            need = 1 + h * w
            if offset + need > budget:
                raise ValueError(f"row {row}: images need more than the packed budget of {budget} token slots "
                                 f"(image {k} of {h}x{w} patches starts at slot {offset})")
            segment_ids[row, offset:offset + need] = k
            is_cls[row, offset] = True
            p = img.reshape(h, patch, w, patch, -1).transpose(0, 2, 1, 3, 4).reshape(h * w, patch, patch, -1)
            patches[row, offset + 1:offset + need] = p
            idx, wt = position_taps(grid, (h, w))
            pos_index[row, offset + 1:offset + need] = idx
            pos_weight[row, offset + 1:offset + need] = wt
            offset += need
    return PackedPatches(patches, segment_ids, is_cls, pos_index, pos_weight)
