"""benchmarks/gpu.sh run as written, in its --tiny mode on the CPU: one JSON line and one table row per measurement,
each with when, where and on what it ran; a measurement past its limit, and the user's mistakes. The targets are
judged by `uhd_jax.perf.report` on hand-written accelerator lines (a CPU run's numbers are never judged)."""
import json
import os
import subprocess
import sys

import jax
import pytest

from uhd_jax.perf import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu.sh")
HEAD = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                      text=True).stdout.strip() or "unknown"   # a copy without .git records 'unknown'
LABELS = ["uhd_v1_1b_sft", "uhd_v2_7b_pretrain", "llava15_1b_vs_torch", "jbu_b16_memory", "decode_7b"]


def gpu_sh(*args, cwd, python=sys.executable):
    # one CPU device (the tests' 8 fake ones are conftest's), LLVM's cheap passes: compiling is this run's cost
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=python,
               XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    env.pop("UHD_JAX_COMMIT", None)
    return subprocess.run(["bash", SCRIPT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("gpu_sh")
    run = gpu_sh("--tiny", "--out", "out", cwd=cwd)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = cwd / "out"
    lines = [json.loads(s) for s in (out / "results.jsonl").read_text().splitlines()]
    return run.stdout, lines, (out / "table.md").read_text(), out


def test_tiny_run_records_every_measurement_with_its_provenance(tiny):
    _, lines, _, out = tiny
    assert [r["label"] for r in lines] == LABELS
    for r in lines:
        assert r.get("status", "ok") == "ok", (r["label"], (out / f"{r['label']}.log").read_text()[-2000:])
        assert r["backend"] == "cpu" and r["device"] == "cpu" and r["device_count"] == 1
        assert r["versions"]["jax"] == jax.__version__ and r["versions"]["torch"] and r["versions"]["python"]
        assert r["commit"] == HEAD or r["commit"] == HEAD + "+dirty"
        assert len(r["utc"]) == 20 and r["utc"].endswith("Z")   # 2026-12-01T23:16:11Z
        assert (out / f"{r['label']}.log").read_text().startswith(f"gpu.sh: {r['label']} (limit ")
    v1, v2, llava, jbu, decode = lines
    assert (v1["config"], v1["stage"], v1["mode"]) == ("configs/uhd_v1.py:tiny", "sft", "train")
    assert (v2["config"], v2["stage"]) == ("configs/uhd_v2.py:7b_tiny", "pretrain")
    assert v2["trains"] == {"vision": False, "projector": True, "llm": False}   # the frozen-LLM stage
    for r in (v1, v2, llava):
        assert r["mfu"] is None and r["model_tflops_per_s"] > 0 and r["compilations"] == 1   # no CPU peak known
    assert llava["speedup_vs_torch"] == pytest.approx(llava["tokens_per_s"] / llava["torch"]["tokens_per_s"])
    assert (jbu["stage"], jbu["batch"], jbu["timed_steps"]) == ("jbu", 16, 1)
    assert jbu["peak_gb"] > 0 and jbu["step_s"]["median"] > 0 and jbu["measured_peak_bytes"] is None   # CPU: none
    assert jbu["peak_gb_judged"] == jbu["peak_gb"]
    assert decode["mode"] == "generate" and decode["llm_param_dtype"] == "bfloat16"
    assert set(decode["batch1"]) >= {"decode_tokens_per_s", "bandwidth_bound", "fraction_of_bound"}
    assert set(decode["batch32"]) >= {"decode_tokens_per_s", "bandwidth_bound", "fraction_of_bound"}


def test_tiny_run_prints_one_table_row_per_measurement(tiny):
    stdout, lines, table, _ = tiny
    assert stdout.rstrip().endswith(table.rstrip())   # the table is the run's last output
    rows = table.strip().splitlines()
    assert rows[0].split("|")[1].strip() == "measurement" and "target" in rows[0] and "commit" in rows[0]
    body = [[c.strip() for c in row.split("|")[1:-1]] for row in rows[2:]]
    assert [r[0] for r in body] == LABELS
    assert body[0][3] == ">= 55.0% MFU" and body[1][3] == ">= 45.0% MFU" and body[2][3] == ">= 1.5 x transformers"
    assert body[3][3] == "<= 40.0 GB peak" and body[4][3] == ">= 70.0% of the bandwidth bound at batch 1"
    assert all(r[4] == "n/a (cpu)" for r in body)   # the targets are the GPU's
    assert body[2][2].startswith(f"{lines[2]['speedup_vs_torch']:.2f}x transformers")
    assert body[3][2].startswith(f"peak {lines[3]['peak_gb']:.2f} GB by XLA's analysis")
    assert all(r[6] == line["utc"] and r[7] == line["commit"] for r, line in zip(body, lines))


def test_a_measurement_past_its_limit_leaves_a_line_and_a_row(tmp_path, capsys):
    from uhd_jax.cli import benchmark

    run = gpu_sh("--tiny", "--only", "decode_7b", "--limit", "1", "--out", "out", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    (line,) = [json.loads(s) for s in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert (line["label"], line["status"], line["rc"], line["limit_s"]) == ("decode_7b", "timeout", 124, 1)
    assert line["config"] == "configs/llava15.py:tiny" and line["commit"] and line["utc"]
    assert "gpu.sh: decode_7b timeout in" in run.stdout
    row = run.stdout.strip().splitlines()[-1]
    assert "| decode_7b " in row and "timeout after" in row and "| no result |" in row
    # the same table from the benchmark command
    assert benchmark.main(["--table", str(tmp_path / "out" / "results.jsonl")]) == 0
    assert capsys.readouterr().out == (tmp_path / "out" / "table.md").read_text()


def test_gpu_sh_user_mistakes(tmp_path):
    run = gpu_sh("--tiny", "--only", "decode_7c", cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.strip() == (
        "gpu.sh: --only decode_7c: no such measurement; choose from " + ",".join(LABELS))
    (tmp_path / "empty").mkdir()
    run = gpu_sh("--wheels", str(tmp_path / "empty"), cwd=tmp_path)
    assert run.returncode == 2 and "holds no .whl files (make them with --prepare-wheels)" in run.stderr
    run = gpu_sh("--limit", "soon", cwd=tmp_path)
    assert run.returncode == 2 and "--limit needs whole seconds" in run.stderr
    run = gpu_sh("--frobnicate", cwd=tmp_path)
    assert run.returncode == 2 and "unknown argument --frobnicate" in run.stderr
    bare = "/usr/bin/python3"   # the system interpreter: no jax
    if not os.path.exists(bare) or subprocess.run([bare, "-c", "import jax"], capture_output=True).returncode == 0:
        pytest.skip(f"no interpreter without jax at {bare}")
    run = gpu_sh("--tiny", cwd=tmp_path, python=bare)
    assert run.returncode == 2 and "lacks: jax flax" in run.stderr and "--prepare-wheels DIR" in run.stderr


def test_targets_are_judged_on_an_accelerator_only():
    gpu = {"backend": "gpu", "device": "NVIDIA H200"}
    assert report.verdict({**gpu, "label": "uhd_v1_1b_sft", "mfu": 0.56}) == (">= 55.0% MFU", "yes")
    assert report.verdict({**gpu, "label": "uhd_v2_7b_pretrain", "mfu": 0.44})[1] == "no"
    assert report.verdict({**gpu, "label": "llava15_1b_vs_torch", "speedup_vs_torch": 1.5})[1] == "yes"
    assert report.verdict({**gpu, "label": "jbu_b16_memory", "peak_gb_judged": 41.0})[1] == "no"
    assert report.verdict({**gpu, "label": "decode_7b", "batch1": {"fraction_of_bound": 0.71}})[1] == "yes"
    assert report.verdict({**gpu, "label": "decode_7b", "batch1": {"fraction_of_bound": None}})[1] == "n/a"
    assert report.verdict({"backend": "cpu", "label": "uhd_v1_1b_sft", "mfu": 0.9})[1] == "n/a (cpu)"
    assert report.verdict({"label": "decode_7b", "status": "timeout"})[1] == "no result"
    assert report.verdict({**gpu, "mode": "data"}) == ("", "")   # unlabelled: no target
