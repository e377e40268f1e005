"""Where and when a benchmark result was measured, and the table `benchmarks/gpu.sh` prints from its JSON lines.

  python -m uhd_jax.perf.report benchmarks/results.jsonl      # or: uhd-benchmark --table FILE

A line with a `label` (gpu.sh names each measurement) is judged against that measurement's target (TARGETS, the
figures issue #18 sets for one H100/H200); lines without one still get a row. Targets are judged only on an
accelerator: a CPU run's numbers show the harness works, not the speed the targets are about.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys

# label -> (field, comparison, bound, what it is); fields are dotted paths into the result line
TARGETS = {
    "uhd_v1_1b_sft": ("mfu", ">=", 0.55, "MFU"),
    "uhd_v2_7b_pretrain": ("mfu", ">=", 0.45, "MFU"),
    "llava15_1b_vs_torch": ("speedup_vs_torch", ">=", 1.5, "x transformers"),
    "jbu_b16_memory": ("peak_gb_judged", "<=", 40.0, "GB peak"),
    "decode_7b": ("batch1.fraction_of_bound", ">=", 0.70, "of the bandwidth bound at batch 1"),
}
PACKAGES = ("jax", "jaxlib", "flax", "optax", "torch", "transformers")


def commit() -> str:
    """UHD_JAX_COMMIT if set (a copy of the tree without .git), else the checkout's HEAD, '+dirty' with tracked
    changes; 'unknown' outside a git checkout."""
    if os.environ.get("UHD_JAX_COMMIT"):
        return os.environ["UHD_JAX_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty else "")


def versions() -> dict:
    """Installed versions read from package metadata (importing torch only to learn its version costs seconds)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance() -> dict:
    return {"utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "commit": commit(), "versions": versions(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            # uhd_jax.cli.host_memory: huge pages for the CPU step's buffers (`glibc.malloc.hugetlb=1`) or not
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


def field(line: dict, path: str):
    for key in path.split("."):
        if not isinstance(line, dict) or key not in line:
            return None
        line = line[key]
    return line


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x, unit: str = "") -> str:
    if x is None:
        return "n/a"
    return (f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}") + unit


def result_text(line: dict) -> str:
    status = line.get("status", "ok")
    if status != "ok":
        return f"{status} after {line.get('wall_s', '?')} s (limit {line.get('limit_s', '?')} s; log {line.get('log')})"
    mode = line.get("mode")
    if mode == "train":
        mfu = ("MFU " + _pct(line["mfu"]) if line.get("mfu") is not None
               else f"MFU n/a (no peak TFLOP/s known for {line.get('device')})")
        text = (f"{mfu}, {_num(line['model_tflops_per_s'])} model TFLOP/s, step {line['step_s']['median']:.4g} s, "
                f"{_num(line['tokens_per_s'])} tokens/s")
        if "speedup_vs_torch" in line:
            text = (f"{line['speedup_vs_torch']:.2f}x transformers ({_num(line['tokens_per_s'])} vs "
                    f"{_num(line['torch']['tokens_per_s'])} tokens/s); " + text)
        return text
    if mode == "memory":
        text = f"peak {line['peak_gb']:.2f} GB by XLA's analysis (temp {line['temp_gb']:.2f} GB)"
        if line.get("measured_peak_gb") is not None:
            text += f", {line['measured_peak_gb']:.2f} GB measured"
        if line.get("step_s"):
            text += f", step {line['step_s']['median']:.4g} s ({_num(line['images_per_s'])} images/s)"
        return text
    if mode == "generate":
        parts = []
        for b in ("batch1", "batch32"):
            r = line.get(b, {})
            bound = r.get("bandwidth_bound_tokens_per_s")
            parts.append(f"b{b[5:]}: {_num(r.get('decode_tokens_per_s'))} tokens/s"
                         + (f" = {_pct(r.get('fraction_of_bound'))} of {_num(bound)}" if bound else
                            " (bound n/a: fits in cache)"))
        return "; ".join(parts)
    return json.dumps({k: v for k, v in line.items() if not isinstance(v, (dict, list))})[:120]


def verdict(line: dict) -> tuple[str, str]:
    """(target text, met) for a labelled line."""
    target = TARGETS.get(line.get("label", ""))
    if target is None:
        return "", ""
    path, op, bound, what = target
    shown = f"{op} {_pct(bound) if path == 'mfu' or 'fraction' in path else bound} {what}".replace("  ", " ")
    if line.get("status", "ok") != "ok":
        return shown, "no result"
    if line.get("backend") == "cpu":
        return shown, "n/a (cpu)"
    value = field(line, path)
    if value is None:
        return shown, "n/a"
    return shown, "yes" if (value >= bound if op == ">=" else value <= bound) else "no"


def rows(lines: list[dict]) -> list[list[str]]:
    out = []
    for line in lines:
        what = line.get("label") or line.get("mode", "?")
        config = f"{line.get('config', '')}" + (f" ({line['stage']})" if line.get("stage") else "")
        target, met = verdict(line)
        out.append([what, config, result_text(line), target, met, str(line.get("device", "")),
                    str(line.get("utc", line.get("date", ""))), str(line.get("commit", ""))])
    return out


def table(lines: list[dict]) -> str:
    head = ["measurement", "config (stage)", "result", "target", "met", "device", "measured (UTC)", "commit"]
    body = rows(lines)
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in body])


def read_lines(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(s) for s in f if s.strip()]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m uhd_jax.perf.report RESULTS.jsonl", file=sys.stderr)
        return 2
    if not os.path.isfile(argv[0]):
        print(f"error: {argv[0]}: no such results file", file=sys.stderr)
        return 2
    print(table(read_lines(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
