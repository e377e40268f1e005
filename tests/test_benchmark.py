"""The FLOP formulas against XLA's own count, the training multipliers, and a CPU smoke run of every benchmark mode
(speed itself is measured by launch/benchmark.py, never asserted here)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uhd_jax.models.llama import Llama, LlamaConfig
from uhd_jax.models.vit import ViTConfig, VisionTransformer
from uhd_jax.perf import flops


def test_llm_formula_matches_xla_forward_and_gradient():
    # The formula counts every query-key score, as the plain kernel computes them ('auto' on the CPU is a chunked
    # causal kernel that skips the blocks above the diagonal: fewer, checked last).
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_layers=2, num_heads=4,
                      num_kv_heads=2, attention_impl="xla")
    model, t, b = Llama(cfg), 256, 2
    x, pos, valid = jnp.zeros((b, t, 256)), jnp.zeros((b, t), jnp.int32), jnp.ones((b, t), bool)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, pos, valid)
    forward = flops.xla_flops(jax.jit(lambda p, x: model.apply(p, x, pos, valid)[0]).lower(params, x))
    formula = flops.llm_forward_flops(cfg, t, b)
    assert abs(forward / formula - 1) < 0.02, (forward, formula)   # the rest is elementwise work
    chunked = Llama(dataclasses.replace(cfg, attention_impl="auto"))
    assert flops.xla_flops(jax.jit(lambda p, x: chunked.apply(p, x, pos, valid)[0]).lower(params, x)) < forward
    # training the weights: XLA's backward is ~2x its forward (the first layer's input gradient is not needed)
    grad = jax.jit(jax.grad(lambda p, x: model.apply(p, x, pos, valid)[0].sum()))
    assert abs(flops.xla_flops(grad.lower(params, x)) / (flops.multipliers(False, False, True)[2] * formula) - 1) < 0.06


def test_vit_formula_matches_xla():
    cfg = ViTConfig(hidden_size=128, intermediate_size=512, num_layers=3, num_heads=4, patch_size=14, image_size=224,
                    select_layer=-2)
    model = VisionTransformer(cfg)
    x = jnp.zeros((2, 224, 224, 3))
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    xla = flops.xla_flops(jax.jit(model.apply).lower(params, x))
    formula = flops.vit_forward_flops(cfg, [16 * 16 + 1] * 2)
    assert cfg.num_computed_layers == 2
    assert abs(xla / formula - 1) < 0.05, (xla, formula)


def test_training_multipliers():
    assert flops.multipliers(False, True, False) == (1.0, 3.0, 2.0)   # stage 1: frozen ViT and LLM
    assert flops.multipliers(False, True, True) == (1.0, 3.0, 3.0)    # LLaVA SFT
    assert flops.multipliers(True, True, True) == (3.0, 3.0, 3.0)     # UHD v2 SFT trains the ViT too
    assert flops.multipliers(False, False, False) == (1.0, 1.0, 1.0)
    step = flops.StepFlops(vision=1.0, projector=2.0, llm=10.0, multipliers=(1.0, 3.0, 2.0))
    assert (step.forward, step.train) == (13.0, 27.0)


def run_benchmark(tmp_path, *args):
    from uhd_jax.cli import benchmark

    out = tmp_path / "results.jsonl"
    assert benchmark.main([*args, "--workdir", str(tmp_path / "w"), "--out", str(out)]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()][-1]


def test_train_mode_reports_a_consistent_step(tmp_path):
    r = run_benchmark(tmp_path, "--config", "configs/llava15.py:tiny", "--stage", "sft", "--mode", "train",
                      "--batch-size", "4", "--steps", "2", "--warmup", "1", "--seq-len", "256", "--mesh", "2,2,2",
                      "--images", "336x336,672x1088", "--peak-tflops", "1", "--compare", "torch",
                      # the plain kernel computes all T^2 scores, as the formula counts them ('auto' on a CPU is a
                      # chunked causal einsum that skips the chunks above the diagonal: XLA counts fewer)
                      "--config.model.attention_impl=xla")
    assert r["compilations"] == 1 and r["trains"] == {"vision": False, "projector": True, "llm": True}
    assert r["tokens_per_step"] == 4 * 256 and r["images_per_step"] == 4   # sequences filled to the budget
    assert r["step_s"]["min"] <= r["step_s"]["median"] <= r["step_s"]["max"]
    parts = r["components_forward_tflop"]
    assert r["model_tflop_per_step"] == pytest.approx(parts["vision"] + 3 * parts["projector"] + 3 * parts["llm"])
    # the model count is what XLA counts minus elementwise, loss and optimizer work
    assert 0.7 < r["model_tflop_per_step"] / r["xla_tflop_per_step"] < 1.0
    assert r["mfu"] == pytest.approx(r["model_tflops_per_s"] / 8)   # 8 devices at the given 1 TFLOP/s peak
    # the same towers in transformers' LLaVA, timed in the same run
    assert r["torch"]["tokens_per_s"] > 0 and r["torch"]["dtype"] == "float32"
    assert r["speedup_vs_torch"] == pytest.approx(r["tokens_per_s"] / r["torch"]["tokens_per_s"])


def test_generate_data_and_compute_modes_run(tmp_path, monkeypatch):
    # --new-tokens and --batch: the spellings before uhd-generate's, kept so recorded commands still run
    g = run_benchmark(tmp_path, "--config", "configs/llava15.py:tiny", "--mode", "generate", "--new-tokens", "4",
                      "--repeats", "1", "--images", "336x336", "--bandwidth-gbs", "10", "--cache-mb", "0")
    assert g["prompt_tokens"] > 64 and set(g) >= {"batch1", "batch32", "llm_weight_bytes", "kv_bytes_per_row"}
    bound = lambda b: b * 10e9 / (g["llm_weight_bytes"] + b * g["kv_bytes_per_row"])  # noqa: E731
    assert g["batch1"]["bandwidth_bound_tokens_per_s"] == pytest.approx(bound(1))
    assert g["batch32"]["bandwidth_bound_tokens_per_s"] == pytest.approx(bound(32))
    d = run_benchmark(tmp_path, "--config", "configs/llava15.py:tiny", "--mode", "data", "--batch-size", "2", "--steps",
                      "2", "--workers", "0", "--images", "336x336", "--seq-len", "256")
    assert d["images_per_s"]["0"] > 0
    monkeypatch.chdir(tmp_path)   # its configs/NAME.py specs are found from any directory, not only the repository's
    c = run_benchmark(tmp_path, "--compare-compute", "--compute-llm", "tiny", "--compute-size", "672x1088")
    # more image tokens, more compute: the ratio is XLA's, the token counts are the data path's
    assert c["uhd_v1:tiny"]["tokens"] > c["llava15:tiny"]["tokens"]
    assert c["uhd_v1:tiny"]["relative_to_llava15"] == pytest.approx(
        c["uhd_v1:tiny"]["forward_tflop_xla"] / c["llava15:tiny"]["forward_tflop_xla"])
    assert np.isfinite(c["uhd_v1:tiny"]["forward_tflop_xla"])


def test_decode_bound_is_not_applicable_when_the_working_set_fits_in_the_cache():
    from uhd_jax.cli.benchmark import decode_bound, last_level_cache_bytes

    # the llava15:demo decode on the 2-core CPU (32 MiB L3): 7.9 MB of weights stay in the cache
    fits = decode_bound(7_900_000, 170_000, 32, 4.7, 32 * 2 ** 20)
    assert fits["bandwidth_bound_tokens_per_s"] is None
    assert fits["bandwidth_bound"].startswith("n/a (weights fit in cache): 7.9 MB weights + 32 x 0.17 MB KV")
    # a 7B model streams from memory: the bound holds and says against which cache it was judged
    big = decode_bound(13_500_000_000, 1_000_000, 1, 3350.0, 50 * 2 ** 20)
    assert big["bandwidth_bound_tokens_per_s"] == pytest.approx(3350e9 / 13_501_000_000)
    assert "> 52.4 MB last-level cache" in big["bandwidth_bound"]
    assert "cache size unknown" in decode_bound(1000, 10, 1, 1.0, None)["bandwidth_bound"]
    cache = last_level_cache_bytes(jax.devices()[0])   # this CPU's, from sysfs (None where Linux does not say)
    assert cache is None or cache >= 2 ** 20


def test_memory_mode_reports_xlas_analysis_of_the_jbu_step(tmp_path, monkeypatch):
    """The mode's plumbing, with the compile stubbed (the real step's analysis: tests/test_jbu_memory.py's pieces,
    benchmarks/README.md's numbers); and `analysis_bytes` on a donated step, where the output reuses the argument."""
    from uhd_jax.cli import benchmark
    from uhd_jax.perf.memory import analysis_bytes

    seen = {}

    def fake(config, name, batch, steps, warmup):
        seen.update(stage=name, batch=batch, kind=config.stages[name].kind, steps=steps)
        return {"peak_bytes": 3 * 10 ** 9, "temp_bytes": 2 * 10 ** 9, "batch": batch}

    monkeypatch.setattr(benchmark, "jbu_step_memory", fake)
    r = run_benchmark(tmp_path, "--config", "configs/uhd_v2.py:tiny", "--mode", "memory", "--batch-size", "16")
    assert seen == {"stage": "jbu", "batch": 16, "kind": "jbu", "steps": 0}   # compiled only: no --execute
    assert r["peak_gb"] == 3.0 and r["temp_gb"] == 2.0 and r["stage"] == "jbu" and r["devices"] == 1

    x = jax.ShapeDtypeStruct((256, 1024), jnp.float32)
    m = analysis_bytes(jax.jit(lambda v: v * 2.0, donate_argnums=0).lower(x).compile())
    assert m["argument_bytes"] == m["output_bytes"] == m["alias_bytes"] == 2 ** 20
    assert m["peak_bytes"] == 2 ** 20 + m["temp_bytes"]


def test_benchmark_cli_user_mistakes(tmp_path, capsys):
    from uhd_jax.cli.benchmark import main
    from tests.cli_mistakes import assert_mistake

    out = ["--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "r.jsonl")]
    tiny = ["--config", "configs/llava15.py:tiny"] + out
    assert_mistake(capsys, main, ["--config", "configs/llava16.py:tiny"] + out, "'configs/llava16.py' not found")
    assert_mistake(capsys, main, ["--config", "configs/llava15.py:7B"] + out, "unknown variant '7B'; choose one of")
    assert_mistake(capsys, main, tiny + ["--config.model.atention_impl=cudnn"],
                   "unknown config key 'atention_impl'; config.model has [")
    assert_mistake(capsys, main, tiny + ["--config.model.scan_layers=maybe"], "expected true or false")
    assert_mistake(capsys, main, tiny + ["--stage", "sfft"], "--stage sfft: configs/llava15.py:tiny has no such stage")
    assert_mistake(capsys, main, ["--config", "configs/uhd_v2.py:tiny", "--stage", "jbu"] + out,
                   "trains the JBU alone; benchmark a LLaVA stage (['pretrain', 'sft']), or its step's memory with "
                   "--mode memory")
    assert_mistake(capsys, main, ["--config", "configs/uhd_v2.py:tiny", "--stage", "sft", "--mode", "memory"] + out,
                   "--mode memory compiles a JBU stage's step; configs/uhd_v2.py:tiny has ['jbu'], not --stage sft")
    assert_mistake(capsys, main, tiny + ["--mode", "memory"], "--mode memory compiles a JBU stage's step; "
                                                              "configs/llava15.py:tiny has none")
    assert_mistake(capsys, main, tiny + ["--cache-mb", "-1"], "--cache-mb cannot be negative")
    assert_mistake(capsys, main, tiny + ["--images", "672by1088"], "expected WIDTHxHEIGHT")
    assert_mistake(capsys, main, tiny + ["--mesh", "2,2"], "give three sizes data,fsdp,tensor")
    assert_mistake(capsys, main, tiny + ["--mesh", "3,1,1"], "needs 3 devices, have 8")
    assert_mistake(capsys, main, tiny + ["--images", "64x64", "--seq-len", "16"], "beyond data.max_length=16; raise "
                                                                                   "--seq-len")
    assert_mistake(capsys, main, tiny + ["--batch-size", "0"], "--batch-size 0: give at least 1")
    assert_mistake(capsys, main, tiny + ["--batch", "0"], "--batch-size 0: give at least 1")   # the old spelling
    assert_mistake(capsys, main, tiny + ["--max-new-tokens", "0"], "--max-new-tokens 0: give at least 1")
    assert_mistake(capsys, main, ["--table", str(tmp_path / "none.jsonl")], "no such results file")
    assert_mistake(capsys, main, tiny + ["--stepz", "3"], "unrecognized arguments: --stepz")
    assert_mistake(capsys, main, ["--compare-compute", "--compute-llm", "14b"] + out,
                   "--compute-llm configs/llava15.py:14b: configs/llava15.py: unknown variant '14b'")
    # a prompt past the tiny LLM's 512 positions would time what no model runs
    assert_mistake(capsys, main, tiny + ["--mode", "generate", "--images", "64x64", "--prompt-words", "700"],
                   "over the prompt limit of 448 (the model's 512 positions less 64 new tokens); lower --prompt-words")
    assert not (tmp_path / "r.jsonl").exists()
