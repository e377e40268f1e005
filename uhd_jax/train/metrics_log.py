"""Training logs: a JSON-lines metrics file, TensorBoard scalars, and a PNG of the loss/accuracy curves."""
from __future__ import annotations

import itertools
import json
import os

from PIL import Image, ImageDraw, ImageFont


def truncate_jsonl(path: str, last_step: int) -> list[dict]:
    """Keep the rows of a JSON-lines log up to `last_step` (rows without a step too) and return them. A run resumed
    from step N repeats the steps after N; their old rows must go, or every reader sees those steps twice. The file
    is replaced in one rename, so a crash here leaves either the old or the new file."""
    rows = read_metrics(path)
    kept = [r for r in rows if not isinstance(r.get("step"), int) or r["step"] <= last_step]
    if len(kept) != len(rows):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, path)
    return kept


_WRITERS = itertools.count()


class MetricsLog:
    """`resume_step`: the step training continues after; rows logged past it by an interrupted run are dropped
    from metrics.jsonl, and TensorBoard is told to purge them (None: append to whatever is there)."""

    def __init__(self, directory: str, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = os.path.join(directory, "metrics.jsonl")
        self._tb = None
        if enabled:
            os.makedirs(directory, exist_ok=True)
            from tensorboardX import SummaryWriter

            tb_dir = os.path.join(directory, "tensorboard")
            purge_step = None
            if resume_step is not None:
                truncate_jsonl(self.path, resume_step)
                purge_step = resume_step + 1 if os.path.isdir(tb_dir) else None
            # pid and count in the name: two writers started within one second would otherwise share a file name,
            # and the second would truncate the first's events.
            self._tb = SummaryWriter(tb_dir, purge_step=purge_step,
                                     filename_suffix=f".{os.getpid()}.{next(_WRITERS)}")

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        row = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) or hasattr(v, "item") else v)
                                for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step" and isinstance(v, float):
                self._tb.add_scalar(k, v, step)

    def close(self):
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(rows: list[dict], out_png: str, keys=("loss", "accuracy"), title: str = "") -> str:
    """One panel per key, step on x; drawn with Pillow so no plotting library is needed."""
    w, h, pad = 520, 300, 46
    panels = [k for k in keys if any(k in r for r in rows)]
    img = Image.new("RGB", (w * max(1, len(panels)), h + 24), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=12)
    d.text((8, 4), title, fill="black", font=font)
    for i, key in enumerate(panels):
        pts = [(r["step"], r[key]) for r in rows if key in r and r[key] == r[key]]  # drop NaN
        x0, y0, x1, y1 = i * w + pad, 24 + 10, (i + 1) * w - 12, h - pad + 24
        d.rectangle((x0, y0, x1, y1), outline="black")
        d.text((x0, y0 - 14 + 2), key, fill="black", font=font)
        if len(pts) < 2:
            continue
        smin, smax = min(p[0] for p in pts), max(p[0] for p in pts)
        vmin, vmax = min(p[1] for p in pts), max(p[1] for p in pts)
        vmax = vmax if vmax > vmin else vmin + 1
        sx = lambda s: x0 + (s - smin) / max(smax - smin, 1) * (x1 - x0)  # noqa: E731
        sy = lambda v: y1 - (v - vmin) / (vmax - vmin) * (y1 - y0)  # noqa: E731
        d.line([(sx(s), sy(v)) for s, v in pts], fill=(30, 90, 200), width=2)
        d.text((x0 - 40, y0), f"{vmax:.3g}", fill="black", font=font)
        d.text((x0 - 40, y1 - 12), f"{vmin:.3g}", fill="black", font=font)
        d.text((x0, y1 + 4), f"step {smin}", fill="black", font=font)
        d.text((x1 - 60, y1 + 4), f"step {smax}", fill="black", font=font)
    img.save(out_png)
    return out_png
