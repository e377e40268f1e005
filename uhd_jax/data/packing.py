"""Host-side packing of variable-size images into the fixed token budget of `ViT.encode_packed` (the vision-tower
part of `uhd_images.fill_row`, for callers that have no resampler)."""
from __future__ import annotations

import numpy as np

from uhd_jax.data.uhd_images import PackedLayout, fill_row
from uhd_jax.models.vit import PackedPatches


def pack_images_for_vit(images: list[list[np.ndarray]], budget: int, patch: int, grid: int) -> PackedPatches:
    """Normalised (H, W, 3) images, one list per row, packed into rows of `budget` token slots.

    Raises ValueError naming the row if its images need more than `budget` slots (a caller moves the sample on)."""
    layout = PackedLayout(patch_budget=budget, max_images=max([1] + [len(r) for r in images]), patch_size=patch,
                          vit_grid=grid, windowed=False)
    out = layout.zeros(len(images))
    for row, row_images in enumerate(images):
        try:
            fill_row(out, row, row_images, layout)
        except ValueError as e:
            raise ValueError(f"row {row}: {e}") from None
    return PackedPatches(out["patches"], out["patch_segment_ids"], out["patch_is_cls"], out["patch_pos_index"],
                         out["patch_pos_weight"], out["image_valid"])
