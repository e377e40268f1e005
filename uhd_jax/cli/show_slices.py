"""Draw how a model cuts an image: the slice grid on the image, the overview (global view) at the size the vision
tower sees it, and each view's pixel size and LLM token count.

  uhd-show-slices --image photo.jpg --config configs/uhd_v2.py [--benchmark textvqa] [--out slices.png]
      [--config.data.slicing.max_slices=4]
  uhd-show-slices --image photo.jpg --checkpoint runs/uhd_v2-7b/sft/final   # the checkpoint's model and config

Schemes: LLaVA-UHD (v1/v2: pre-resize by the benchmark rule, `slice_image`, the spatial schema's token count with
separators), SliME (letterboxed tiles and a squashed global view; local tokens before the router drops any) and the
fixed-336 models (LLaVA-1.5, LLaVAR: the image padded to a square).

Picture layout: a 40 px header, the image panel (long side `--display` px) and the overview at its own pixel size side
by side with 16 px margins; the overview's caption takes 20 px under it.
"""
from __future__ import annotations

import argparse
import os
import sys


from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from uhd_jax.cli_errors import UserError, load_config, reports_user_errors, require_file, split_overrides  # noqa: E402
from uhd_jax.eval.benchmarks import BENCHMARKS  # noqa: E402

MARGIN, HEADER, CAPTION = 16, 40, 20


def slice_plan(image: Image.Image, config, benchmark: str = "open") -> dict:
    """What the model makes of `image`: {'scheme', 'input_size' (after pre-resize), 'grid' (cols, rows) or None,
    'cells' [(x0, y0, x1, y1) as fractions of the image panel, (w, h) px, tokens], 'overview' (PIL image),
    'overview_tokens', 'tokens' (all image positions in the LLM sequence), 'canvas' (the image the cells cut)}."""
    from uhd_jax.data.image_processing import expand_to_square
    from uhd_jax.data.slicing import letterbox, modularize, slime_global_view, slime_grid
    from uhd_jax.eval.benchmarks import eval_rule
    from uhd_jax.eval.model_vqa import eval_config
    from uhd_jax.models.config import vlm_config
    from uhd_jax.models.projectors import RESAMPLER_TYPES
    from uhd_jax.models.spatial_schema import image_token_count
    from uhd_jax.train.trainer import slicing_options

    image = image.convert("RGB")
    cfg = vlm_config(config.model.to_dict())
    size = cfg.vision.image_size
    if cfg.slime is not None:
        tile = size
        cols, rows = slime_grid(*image.size, tile=tile)
        canvas = letterbox(image, cols * tile, rows * tile)
        per = cfg.slime.local_grid ** 2
        cells = [((c / cols, r / rows, (c + 1) / cols, (r + 1) / rows), (tile, tile), per)
                 for r in range(rows) for c in range(cols)]
        glob = cfg.slime.global_grid ** 2
        return {"scheme": "SliME", "input_size": image.size, "grid": (cols, rows), "cells": cells, "canvas": canvas,
                "overview": slime_global_view(image, tile), "overview_tokens": glob,
                "tokens": glob + 1 + per * len(cells)}
    if not cfg.packed_images:
        square = expand_to_square(image)
        n = cfg.tokens_per_image
        return {"scheme": "fixed 336 (pad to square)", "input_size": image.size, "grid": None, "cells": [],
                "canvas": square, "overview": square.resize((size, size), Image.Resampling.BICUBIC),
                "overview_tokens": n, "tokens": n}
    from uhd_jax.eval.model_vqa import rule_for

    rule = rule_for(config, benchmark) if benchmark else eval_rule(config.family, "open", False)
    config = eval_config(config, rule)
    options = slicing_options(config, config.stages[list(config.stage_order)[-1]])
    sliced = modularize(image, options)
    query = RESAMPLER_TYPES[cfg.projector_type]["grid"]
    per = query * query
    cells = []
    if sliced.grid is not None:
        cols, rows = sliced.grid
        cells = [((c / cols, r / rows, (c + 1) / cols, (r + 1) / rows), sliced.slices[r * cols + c].size, per)
                 for r in range(rows) for c in range(cols)]
    input_size = image.size
    if options.pre_resize:
        from uhd_jax.data.slicing import resize_keep_ratio

        input_size = resize_keep_ratio(image, options.pre_resize, options.pre_resize_upscale_only).size
    tokens = image_token_count(sliced.grid, query_grid=query, schema=config.data.get("schema", "v1"))
    return {"scheme": f"LLaVA-UHD ({config.family}, M={options.max_slices}, pre-resize {options.pre_resize or 'none'})",
            "input_size": input_size, "grid": sliced.grid, "cells": cells, "canvas": image,
            "overview": sliced.overview, "overview_tokens": per, "tokens": tokens}


def picture_size(canvas_size: tuple[int, int], overview_size: tuple[int, int], display: int) -> tuple[int, int]:
    """(width, height) of the picture for an image panel of `canvas_size` scaled to long side `display`."""
    w, h = canvas_size
    scale = display / max(w, h)
    pw, ph = round(w * scale), round(h * scale)
    ow, oh = overview_size
    return 3 * MARGIN + pw + ow, HEADER + max(ph, oh + CAPTION) + MARGIN


def draw(plan: dict, out_png: str, display: int = 768, source: str = "") -> str:
    canvas, overview = plan["canvas"], plan["overview"]
    width, height = picture_size(canvas.size, overview.size, display)
    scale = display / max(canvas.size)
    pw, ph = round(canvas.width * scale), round(canvas.height * scale)
    img = Image.new("RGB", (width, height), (255, 255, 255))
    img.paste(canvas.resize((pw, ph), Image.Resampling.BICUBIC), (MARGIN, HEADER))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=14)
    grid = f"grid {plan['grid'][0]}x{plan['grid'][1]}" if plan["grid"] else "not split"
    d.text((MARGIN, 4), f"{os.path.basename(source)} {plan['input_size'][0]}x{plan['input_size'][1]} -> {grid}, "
                        f"{plan['tokens']} image tokens", fill=(0, 0, 0), font=font)
    d.text((MARGIN, 21), plan["scheme"], fill=(90, 90, 90), font=font)
    for (x0, y0, x1, y1), (sw, sh), tokens in plan["cells"]:
        box = (MARGIN + x0 * pw, HEADER + y0 * ph, MARGIN + x1 * pw - 1, HEADER + y1 * ph - 1)
        d.rectangle(box, outline=(230, 20, 20), width=3)
        label = f"{sw}x{sh}\n{tokens} tok"
        d.multiline_text((box[0] + 6, box[1] + 6), label, fill=(230, 20, 20), font=font, stroke_width=2,
                         stroke_fill=(255, 255, 255))
    ox = 2 * MARGIN + pw
    img.paste(overview, (ox, HEADER))
    d.rectangle((ox, HEADER, ox + overview.width - 1, HEADER + overview.height - 1), outline=(20, 90, 230), width=2)
    d.text((ox, HEADER + overview.height + 3), f"overview {overview.width}x{overview.height}, "
                                                f"{plan['overview_tokens']} tok", fill=(20, 90, 230), font=font)
    img.save(out_png)
    return out_png


def open_image(path: str) -> Image.Image:
    require_file(path, "image", "give an image file")
    try:
        image = Image.open(path)
        image.load()
    except (OSError, Image.DecompressionBombError) as e:
        raise UserError(f"image {path} cannot be read ({e}); give a PNG, JPEG or another format PIL reads") from None
    return image


@reports_user_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", dest="image_flag", metavar="IMAGE", help="the image (as uhd-generate's --image)")
    p.add_argument("image", nargs="?", help=argparse.SUPPRESS)   # the positional form of earlier versions
    p.add_argument("--config", help="configs/NAME.py[:variant]; --config.KEY=VALUE overrides an entry")
    p.add_argument("--checkpoint", help="a checkpoint directory: its model, in its family's config (instead of, or "
                                        "checked against, --config)")
    p.add_argument("--benchmark", default="open", choices=sorted(BENCHMARKS), metavar="NAME",
                   help="evaluation rule for the UHD pre-resize and slice count, one of: "
                        + ", ".join(sorted(BENCHMARKS)))
    p.add_argument("--out", default=None, help="PNG to write (default: <image>.slices.png)")
    p.add_argument("--display", type=int, default=768, help="long side of the image panel, px")
    a, extra = p.parse_known_args(argv)
    overrides = split_overrides(extra, p)
    if a.display < 1:
        p.error(f"--display {a.display}: give the panel's long side in pixels, at least 1")
    if bool(a.image) == bool(a.image_flag):
        p.error("give the image once: --image IMAGE")
    a.image = a.image or a.image_flag
    if not (a.config or a.checkpoint):
        p.error("give --config configs/NAME.py[:variant] or --checkpoint DIR")
    image = open_image(a.image)
    if a.checkpoint:
        from uhd_jax.eval.checkpoint_config import experiment

        config = experiment(a.checkpoint, a.config, overrides).config
    else:
        config = load_config(a.config, overrides)
    plan = slice_plan(image, config, a.benchmark)
    out = a.out or os.path.splitext(a.image)[0] + ".slices.png"
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    out = draw(plan, out, a.display, a.image)
    grid = plan["grid"] or "no slices"
    print(f"{plan['scheme']}: {plan['input_size'][0]}x{plan['input_size'][1]}, grid {grid}, "
          f"{len(plan['cells'])} slice(s) + overview {plan['overview'].size[0]}x{plan['overview'].size[1]}, "
          f"{plan['tokens']} image tokens -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
