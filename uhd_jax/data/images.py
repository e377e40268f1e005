"""Image files -> RGB PIL images, with every failure turned into a `SampleError` that names the file and the fix.

Handles EXIF orientation, palette/alpha/CMYK/16-bit/float modes, and a decompression-bomb limit checked from the header
before any pixel is decoded (so a 20000x20000 PNG costs nothing).
"""
from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default limit
DEFAULT_MIN_AREA = 16


class SampleError(ValueError):
    """A sample that cannot be trained on; the message says which file or field and why. Counted, never fatal.
    `kind` groups the reasons for a summary (uhd-check-data): 'missing image', 'corrupt image', ..."""

    def __init__(self, message: str, kind: str = "bad sample"):
        super().__init__(message)
        self.kind = kind


def _to_rgb(img: Image.Image, alpha: str) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") and alpha == "white":
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(canvas, rgba)
    return img.convert("RGB")


def load_image(path: str, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_area: int = DEFAULT_MIN_AREA,
               alpha: str = "drop") -> Image.Image:
    """Open, orient and convert one image. `alpha='drop'` is the originals' `convert('RGB')`; 'white' composites."""
    if not os.path.exists(path):
        raise SampleError(f"image file not found: {path} (check the image folder given to the data config)",
                          "missing image")
    if os.path.getsize(path) == 0:
        raise SampleError(f"image file is empty (0 bytes): {path}", "corrupt image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Our own pixel limit below, from the header; and a truncated file is an error even in a process where
            # another library (lmms-eval's task module) has set PIL to load truncated images.
            saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, False
            try:
                img = Image.open(path)
                w, h = img.size
                if w * h > max_pixels:
                    raise SampleError(f"image {path} is {w}x{h} = {w * h} pixels, above the decompression-bomb limit "
                                      f"of {max_pixels} (raise data.max_image_pixels if it is genuine)",
                                      "image too large")
                if w * h < min_area:
                    raise SampleError(f"image {path} is {w}x{h}, below data.min_image_area={min_area} pixels: too "
                                      f"small to carry content", "image too small")
                img.load()
            finally:
                Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img, alpha)
    except SampleError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise SampleError(f"cannot decode image {path}: {e}", "corrupt image") from None
