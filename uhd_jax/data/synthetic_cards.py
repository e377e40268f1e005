"""The demo's dataset (`make demo`, issue #19): long cards whose fine detail only a native-resolution view can read.

Each image is a 4:1 (or 1:4) card in four square cells along its long side: one to three large shapes of one kind
and colour on a coloured background (the coarse content, visible at any resolution) and, in a free cell, a
one-digit code in small print (`CODE_FRACTION` of the short side, ~1/7: 16 px on a 448 x 112 card). What each
image path sees of the code: a fixed-resolution model padding the card to a square and resizing it to B px (LLaVA-1.5
at the demo's B = 112) sees the card at scale B / long side, so the digits are ~4 px high, under a third of a 14 px
patch; slices of ~B^2 area (LLaVA-UHD, 4 slices along the card) see each cell at full B px, the digits ~16 px high;
its overview sees them at ~8 px. The layout scales with the image, so any long side gives the same views.

Questions: *fine* ("What is the code?") and *coarse* (the card's colour, the shapes' kind, colour and count).
Captions (stage 1) spell out everything, the code included. Sample i is drawn from
`numpy.random.default_rng([seed, i])`: a split is deterministic and independent of how it is written.
`glyph_cell` draws single cells, with the code's patches labelled, to pretrain the demo's ViT to read
(`uhd_jax.train.glyph_vit`): the demo's stand-in for CLIP's pretraining.

  python -m uhd_jax.data.synthetic_cards --out runs/demo/data/synthetic --train 2000 --eval 200
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUNDS = {"white": (245, 245, 245), "yellow": (245, 225, 110), "gray": (175, 175, 175), "cyan": (160, 225, 235)}
COLORS = {"red": (200, 30, 30), "blue": (30, 60, 200), "green": (20, 140, 40), "purple": (120, 40, 160)}
SHAPES = ("circle", "square", "triangle")
CODE_DIGITS = 1
CODE_FRACTION = 1 / 7     # digit height / short side
SHAPE_FRACTION = 0.7      # shape diameter / short side

FINE_QUESTIONS = ("What is the code?",)
COARSE_QUESTIONS = ("What color is the card?", "What shape is on the card?", "What color are the shapes?",
                    "How many shapes are there?")
SHORT = "\nAnswer the question using a single word or phrase."
CAPTION_PROMPT = "<image>\nDescribe the image briefly."


def group_of(question: str) -> str:
    return "fine" if question in FINE_QUESTIONS else "coarse"


def _shape(d: ImageDraw.ImageDraw, kind: str, box, fill):
    x0, y0, x1, y1 = box
    if kind == "circle":
        d.ellipse(box, fill=fill)
    elif kind == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _code(d: ImageDraw.ImageDraw, rng, code: str, ox: float, oy: float, short: int):
    """Print `code` at a random place of the cell at (ox, oy) of side `short`."""
    font = ImageFont.load_default(size=max(4, round(CODE_FRACTION * short)))
    left, top, right, bottom = d.textbbox((0, 0), code, font=font)
    tx = ox + rng.uniform(0.05, 0.95) * (short - (right - left)) - left
    ty = oy + rng.uniform(0.05, 0.95) * (short - (bottom - top)) - top
    d.text((tx, ty), code, fill=(0, 0, 0), font=font)


def render(seed: int, index: int, long_side: int = 448):
    """(image, caption, [(question, answer), ...]) of sample `index` of the stream `seed`, long side `long_side`."""
    rng = np.random.default_rng([seed, index])
    short = max(long_side // 4, 8)
    wide = bool(rng.integers(2))
    w, h = (4 * short, short) if wide else (short, 4 * short)
    bg, color = str(rng.choice(list(BACKGROUNDS))), str(rng.choice(list(COLORS)))
    kind = str(rng.choice(SHAPES))
    n = int(rng.integers(1, 4))
    cells = rng.permutation(4)
    code = "".join(str(int(x)) for x in rng.integers(0, 10, size=CODE_DIGITS))
    img = Image.new("RGB", (w, h), BACKGROUNDS[bg])
    d = ImageDraw.Draw(img)

    def origin(cell):
        return (cell * short, 0) if wide else (0, cell * short)

    size = SHAPE_FRACTION * short
    for cell in cells[:n]:
        ox, oy = origin(int(cell))
        jx, jy = rng.uniform(0, short - size, size=2)
        _shape(d, kind, (ox + jx, oy + jy, ox + jx + size, oy + jy + size), COLORS[color])
    _code(d, rng, code, *origin(int(cells[3])), short)
    plural = kind + "s" if n > 1 else kind
    caption = f"a {bg} card with {n} {color} {plural} and the code {code}"
    qa = [("What is the code?", code), ("What color is the card?", bg), ("What shape is on the card?", kind),
          ("What color are the shapes?", color), ("How many shapes are there?", str(n))]
    return img, caption, qa


def glyph_cell(seed: int, index: int, side: int, size: int = 112, patch: int = 14):
    """One cell of a card as a slice shows it, for pretraining a ViT to read: drawn at `side` px (the cell of a card
    with long side 4 x `side`), resized to `size` (PIL bicubic, as slices are), with a digit on 80% of cells and part
    of a shape on half. Returns (image, labels, background): per patch (row-major, (size // patch)^2) the digit if
    the patch holds at least a fifth of its ink, else 10 (no digit); the background's index in `BACKGROUNDS`."""
    rng = np.random.default_rng([seed, index])
    background = str(rng.choice(list(BACKGROUNDS)))
    img = Image.new("RGB", (side, side), BACKGROUNDS[background])
    d = ImageDraw.Draw(img)
    if rng.random() < 0.5:   # shapes may spill in from the next cell
        extent = SHAPE_FRACTION * side
        x, y = rng.uniform(-0.4 * side, side - 0.6 * extent, size=2)
        _shape(d, str(rng.choice(SHAPES)), (x, y, x + extent, y + extent), COLORS[str(rng.choice(list(COLORS)))])
    digit = int(rng.integers(10)) if rng.random() < 0.8 else None
    if digit is not None:
        _code(d, rng, str(digit), 0, 0, side)
    if side != size:
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    grid = size // patch
    labels = np.full(grid * grid, 10, np.int32)
    if digit is not None:   # ink: the only near-black pixels (shapes and backgrounds are coloured)
        ink = np.asarray(img, np.int32).max(axis=-1) < 90
        per_patch = ink[:grid * patch, :grid * patch].reshape(grid, patch, grid, patch).sum(axis=(1, 3)).ravel()
        labels[per_patch >= 0.2 * max(per_patch.sum(), 1)] = digit
    return img, labels, list(BACKGROUNDS).index(background)


def write_dataset(out: str, split: str, n: int, seed: int, long_side: int = 448, turns: int = 0) -> dict:
    """Render `n` cards into `out/images/{split}/`; write `out/{split}_pretrain.json` (captions) and
    `out/{split}_sft.json`. `turns` > 0: each SFT sample asks that many of its image's questions (training; the
    code always among them); 0: one sample per image and question group, the code and one coarse question (held-out
    scoring, half fine and half coarse)."""
    img_dir = os.path.join(out, "images", split)
    os.makedirs(img_dir, exist_ok=True)
    pretrain, sft = [], []
    for i in range(n):
        img, caption, qa = render(seed, i, long_side)
        rel = f"{split}/{split}_{i:06d}.png"
        img.save(os.path.join(out, "images", rel))
        sid = f"{split}-{i:06d}"
        pretrain.append({"id": sid, "image": rel, "conversations": [
            {"from": "human", "value": CAPTION_PROMPT}, {"from": "gpt", "value": caption}]})
        rng = np.random.default_rng([seed, i, 1])
        if turns:
            order = [0] + [1 + int(k) for k in rng.permutation(len(qa) - 1)[:turns - 1]]
            order = [order[int(k)] for k in rng.permutation(len(order))]
            sft.append({"id": sid, "image": rel, "conversations": _turns([qa[k] for k in order])})
        else:
            coarse = qa[1 + int(rng.integers(len(qa) - 1))]
            for tag, pair in (("fine", qa[0]), ("coarse", coarse)):
                sft.append({"id": f"{sid}-{tag}", "image": rel, "group": tag, "conversations": _turns([pair])})
    paths = {"pretrain": os.path.join(out, f"{split}_pretrain.json"), "sft": os.path.join(out, f"{split}_sft.json"),
             "images": os.path.join(out, "images")}
    for key, rows in (("pretrain", pretrain), ("sft", sft)):
        with open(paths[key], "w") as f:
            json.dump(rows, f)
    return paths


def _turns(pairs) -> list[dict]:
    conv = []
    for j, (question, answer) in enumerate(pairs):
        prompt = f"<image>\n{question}" if j == 0 else question
        conv += [{"from": "human", "value": prompt + SHORT}, {"from": "gpt", "value": answer}]
    return conv


def main(argv=None):
    from uhd_jax.data.synthetic import build_tokenizer, corpus_texts

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--eval", type=int, default=200)
    p.add_argument("--long-side", type=int, default=448)
    p.add_argument("--turns", type=int, default=3)
    a = p.parse_args(argv)
    train = write_dataset(a.out, "train", a.train, 0, a.long_side, a.turns)
    write_dataset(a.out, "eval", a.eval, 1, a.long_side)
    build_tokenizer(corpus_texts([train["pretrain"], train["sft"]]), os.path.join(a.out, "tokenizer"), 1024)
    print(f"wrote {a.train} train and {a.eval} eval cards and a tokenizer to {a.out}")


if __name__ == "__main__":
    main()
