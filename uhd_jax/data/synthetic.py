"""The embedded default dataset: synthetic text-rich images rendered with Pillow alone (as LLaVAR's OCR data).

Four kinds of image - signs, receipts, pages and bar charts - with words and numbers at many sizes and positions,
aspect ratios from 1:4 to 4:1 and long sides up to `max_side` (2048 by default). Each image comes with a caption
(pretraining, `plain` template) and question/answer turns whose answers need reading the text ("What is the
total?", "What is written in the top-right corner?"), plus questions about the whole image (its kind, a sign's
colour) that give a model its first reason to look. Sample i is drawn from `Generator(seed, i)`, so a split is
deterministic and independent of how it is generated. `write_dataset` writes LLaVA-format JSON plus an image folder;
`build_tokenizer` trains a small BPE tokenizer on the generated text and saves a `transformers` tokenizer directory.

  python -m uhd_jax.data.synthetic --out data/synthetic --train 3000 --eval 300
"""
from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORS = {"red": (200, 30, 30), "blue": (30, 60, 200), "green": (20, 140, 40), "black": (10, 10, 10),
          "orange": (235, 120, 10), "purple": (120, 40, 160)}
BACKGROUNDS = {"white": (250, 250, 250), "yellow": (250, 230, 120), "gray": (200, 200, 200),
               "cyan": (170, 230, 240)}
WORDS = ("OPEN", "SALE", "EXIT", "STOP", "CAFE", "BANK", "HOTEL", "PARK", "TAXI", "BOOKS", "MUSIC", "PIZZA", "DOCTOR",
         "SCHOOL", "MARKET", "GARDEN", "RIVER", "NORTH", "SOUTH", "TRAIN", "BREAD", "PHONE", "WATER", "LIGHT")
ITEMS = ("apple", "bread", "milk", "rice", "tea", "coffee", "eggs", "cheese", "butter", "salt", "sugar", "juice",
         "soap", "pasta", "beans", "honey")
FILLER = ("the", "a", "of", "and", "to", "in", "is", "for", "on", "with", "report", "data", "city", "year", "new",
          "plan", "team", "work", "note", "page", "line", "text", "small", "print", "price", "store")
KINDS = ("sign", "receipt", "page", "chart")
KIND_NAMES = {"sign": "sign", "receipt": "receipt", "page": "page", "chart": "bar chart"}

CAPTION_PROMPT = "<image>\nDescribe the image briefly."


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(6, int(size)))


def _canvas(rng, min_side: int, max_side: int):
    aspect = math.exp(rng.uniform(math.log(1 / 4), math.log(4)))  # width / height
    long_side = int(rng.uniform(min_side, max_side))
    if aspect >= 1:
        w, h = long_side, max(min_side // 4, int(long_side / aspect))
    else:
        w, h = max(min_side // 4, int(long_side * aspect)), long_side
    return w, h


def _fit_font(draw, text: str, box_w: int, box_h: int, frac: float = 0.8):
    size = max(6, int(box_h * frac))
    while size > 6:
        font = _font(size)
        l, t, r, b = draw.textbbox((0, 0), text, font=font)
        if r - l <= box_w * frac and b - t <= box_h * frac:
            return font
        size = int(size * 0.85)
    return _font(6)


def _sign(rng, w, h):
    bg_name = rng.choice(list(BACKGROUNDS))
    color = rng.choice(list(COLORS))
    word = str(rng.choice(WORDS))
    img = Image.new("RGB", (w, h), BACKGROUNDS[bg_name])
    d = ImageDraw.Draw(img)
    font = _fit_font(d, word, w, h, 0.85)
    l, t, r, b = d.textbbox((0, 0), word, font=font)
    x = (w - (r - l)) // 2 - l + int(rng.integers(-w // 20, w // 20 + 1))
    y = (h - (b - t)) // 2 - t + int(rng.integers(-h // 20, h // 20 + 1))
    d.text((x, y), word, fill=COLORS[color], font=font)
    caption = f"a {bg_name} sign that says {word} in {color} letters"
    qa = [("What does the sign say?", word), ("What color is the text?", color), ("What color is the sign?", bg_name)]
    return img, caption, qa


def _receipt(rng, w, h):
    n = int(rng.integers(2, 6))
    items = [str(x) for x in rng.choice(ITEMS, size=n, replace=False)]
    cents = rng.integers(50, 2000, size=n)
    total = int(cents.sum())
    lines = [f"{it} {c // 100}.{c % 100:02d}" for it, c in zip(items, cents)] + [f"TOTAL {total // 100}.{total % 100:02d}"]
    img = Image.new("RGB", (w, h), (250, 250, 245))
    d = ImageDraw.Draw(img)
    line_h = h / (len(lines) + 1)
    font = _fit_font(d, max(lines, key=len), w, int(line_h), 0.9)
    for i, line in enumerate(lines):
        d.text((int(w * 0.05), int(line_h * (i + 0.5))), line, fill=(0, 0, 0), font=font)
    total_str = f"{total // 100}.{total % 100:02d}"
    caption = f"a receipt listing {n} items with a total of {total_str}"
    qa = [("What is the total?", total_str), ("How many items are listed?", str(n)),
          ("What is the first item?", items[0])]
    return img, caption, qa


def _page(rng, w, h):
    title, corner = (str(x) for x in rng.choice(WORDS, size=2, replace=False))
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    head = _fit_font(d, title, w // 2, h // 6, 0.9)
    d.text((int(w * 0.04), int(h * 0.03)), title, fill=(0, 0, 0), font=head)
    small = _fit_font(d, corner, w // 4, h // 10, 0.9)
    l, t, r, b = d.textbbox((0, 0), corner, font=small)
    d.text((w - (r - l) - int(w * 0.03) - l, int(h * 0.03) - t), corner, fill=(0, 0, 0), font=small)
    body = _font(max(6, h // 30))
    y = int(h * 0.25)
    while y < h * 0.95:
        words = " ".join(str(x) for x in rng.choice(FILLER, size=int(rng.integers(3, 9))))
        d.text((int(w * 0.04), y), words, fill=(40, 40, 40), font=body)
        y += max(8, h // 22)
    caption = f"a page titled {title} with the word {corner} in the top-right corner"
    qa = [("What is the title?", title), ("What is written in the top-right corner?", corner)]
    return img, caption, qa


def _chart(rng, w, h):
    k = int(rng.integers(2, 7))
    labels = [str(x) for x in rng.choice(ITEMS, size=k, replace=False)]
    values = rng.choice(np.arange(1, 10), size=k, replace=False)
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    base, top = int(h * 0.85), int(h * 0.1)
    slot = w / (k + 1)
    font = _fit_font(d, max(labels, key=len), int(slot), int(h * 0.12), 0.9)
    color = COLORS[str(rng.choice(list(COLORS)))]
    for i, (lab, v) in enumerate(zip(labels, values)):
        x0 = int(slot * (i + 0.6))
        y0 = base - int((base - top) * v / 9)
        d.rectangle((x0, y0, x0 + int(slot * 0.7), base), fill=color)
        d.text((x0, base + 2), lab, fill=(0, 0, 0), font=font)
    tallest = labels[int(np.argmax(values))]
    caption = f"a bar chart with {k} bars where {tallest} is the tallest"
    qa = [("How many bars are in the chart?", str(k)), ("Which bar is the tallest?", tallest)]
    return img, caption, qa


RENDERERS = {"sign": _sign, "receipt": _receipt, "page": _page, "chart": _chart}


def render(seed: int, index: int, min_side: int = 96, max_side: int = 2048, kinds=KINDS):
    """(image, kind, caption, [(question, answer), ...]) of sample `index` of the stream `seed`."""
    rng = np.random.default_rng([seed, index])
    kind = str(rng.choice(list(kinds)))
    w, h = _canvas(rng, min_side, max_side)
    img, caption, qa = RENDERERS[kind](rng, w, h)
    # A question about the whole image: easy to see, it gives a model its first reason to look (as LLaVAR's data
    # mixes global questions with reading ones).
    qa.append(("What kind of image is this?", KIND_NAMES[kind]))
    return img, kind, caption, qa


def write_dataset(out: str, split: str, n: int, seed: int, min_side: int = 96, max_side: int = 2048,
                  kinds=KINDS, image_format: str = "png") -> dict:
    """Render `n` samples into `out/images/{split}/` and write `out/{split}_pretrain.json`, `out/{split}_sft.json`.

    Pretraining samples are captions; SFT samples ask one or two of the image's questions (human turn first, with
    `<image>` in front). Returns the paths written.
    """
    img_dir = os.path.join(out, "images", split)
    os.makedirs(img_dir, exist_ok=True)
    pretrain, sft = [], []
    for i in range(n):
        img, kind, caption, qa = render(seed, i, min_side, max_side, kinds)
        name = f"{split}_{i:06d}.{image_format}"
        img.save(os.path.join(img_dir, name))
        rel = f"{split}/{name}"
        sid = f"{split}-{i:06d}"
        pretrain.append({"id": sid, "image": rel, "conversations": [
            {"from": "human", "value": CAPTION_PROMPT}, {"from": "gpt", "value": caption}]})
        rng = np.random.default_rng([seed, i, 1])
        order = rng.permutation(len(qa))[: int(rng.integers(1, 3))]
        conv = []
        for j, q in enumerate(order):
            question, answer = qa[q]
            prompt = f"<image>\n{question}" if j == 0 else question
            conv += [{"from": "human", "value": prompt + "\nAnswer the question using a single word or phrase."},
                     {"from": "gpt", "value": answer}]
        sft.append({"id": sid, "image": rel, "kind": kind, "conversations": conv})
    paths = {"pretrain": os.path.join(out, f"{split}_pretrain.json"), "sft": os.path.join(out, f"{split}_sft.json"),
             "images": os.path.join(out, "images")}
    for key in ("pretrain", "sft"):
        with open(paths[key], "w") as f:
            json.dump(pretrain if key == "pretrain" else sft, f)
    return paths


def build_tokenizer(texts, out_dir: str, vocab_size: int = 1024):
    """Train a Llama-style BPE tokenizer (▁ word prefix, single digits, <unk>=0 <s>=1 </s>=2) on `texts` and save
    it as a `transformers` tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Punctuation(),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=list("0123456789.,:?!'\n"), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")
    fast.save_pretrained(out_dir)
    return fast


def corpus_texts(json_paths) -> list[str]:
    """Every string a model will be asked to tokenize: conversations plus the chat templates' fixed text."""
    from uhd_jax.data.templates import TEMPLATES

    texts = []
    for path in json_paths:
        with open(path) as f:
            for sample in json.load(f):
                texts += [m["value"] for m in sample["conversations"]]
    texts += [t.system for t in TEMPLATES.values()] + ["USER: ASSISTANT:"] * 20
    return texts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--eval", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-side", type=int, default=96)
    p.add_argument("--max-side", type=int, default=2048)
    p.add_argument("--vocab-size", type=int, default=1024)
    a = p.parse_args(argv)
    train = write_dataset(a.out, "train", a.train, a.seed, a.min_side, a.max_side)
    held = write_dataset(a.out, "eval", a.eval, a.seed + 1, a.min_side, a.max_side)
    build_tokenizer(corpus_texts([train["pretrain"], train["sft"]]), os.path.join(a.out, "tokenizer"),
                    a.vocab_size)
    print(f"wrote {a.train} train and {a.eval} eval samples and a tokenizer to {a.out}")
    return train, held


if __name__ == "__main__":
    main()
