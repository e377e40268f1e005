"""QLoRA: int8 / int4 round-trip bounds (worked out from the definitions, not from the code), the packed nibble
layout, loss and adapter gradients against bf16 LoRA on a tiny Llama, the base's bytes, float checkpoints quantised
on load, a QLoRA stage's rules leaving the quantised base without gradient or optimizer state, a short training run
against bf16 LoRA, and QLoRA checkpoints exported (base dequantised) to every format."""
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uhd_jax.models import quant
from uhd_jax.models.config import llm_config
from uhd_jax.models.llama import Llama, positions_from_mask
from uhd_jax.train import optimizer as opt
from uhd_jax.train.param_tree import flatten, unflatten

LLM = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
           max_position_embeddings=64, attention_impl="xla")
LORA = dict(rank=4, alpha=8.0, dropout=0.0)
IDS = np.random.default_rng(0).integers(0, 128, size=(2, 16)).astype(np.int32)
# Stated tolerances relative to bf16 LoRA: loss, worst adapter tensor's gradient, all adapter gradients together.
# Measured: int8 4.2e-6 / 1.7e-2 / 7.6e-3, int4 3.9e-4 / 0.29 / 0.12 (int4's 15 levels per group of 64 move each base
# weight by up to ~7% of its group's max, and a gradient feels every layer above it).
TOL = {"int8": dict(loss=1e-4, grad=5e-2, all=2e-2), "int4": dict(loss=2e-3, grad=4e-1, all=2e-1)}
# A short training run (STEPS Adam steps at LR): worst step's loss relative to bf16 LoRA's. Measured int8 3.2e-3,
# int4 1.7e-2, while the loss itself falls by 20%.
TRAIN_TOL = {"int8": 1e-2, "int4": 5e-2}
STEPS, LR = 24, 1e-2


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("shape, n_in", [((64, 4, 8), 1), ((4, 16, 32), 2)])
def test_int8_round_trip_within_half_a_step(shape, n_in):
    w = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    q, s = quant.quantize(w, n_in, "int8")
    step = np.abs(w).max(axis=tuple(range(n_in))) / 127.0   # symmetric, one step per output channel
    assert q.dtype == jnp.int8 and q.shape == shape and np.abs(np.asarray(q)).max() <= 127
    np.testing.assert_allclose(np.asarray(s), step, rtol=1e-6)
    err = np.abs(np.asarray(quant.dequantize(q, s, n_in, "int8")) - w)
    assert np.all(err <= step / 2 * (1 + 1e-5))


@pytest.mark.parametrize("shape, n_in", [((128, 6), 1), ((4, 32, 16), 2)])
def test_int4_round_trip_within_half_a_group_step(shape, n_in):
    w = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    q, s = quant.quantize(w, n_in, "int4")
    rows = int(np.prod(shape[:n_in]))
    groups = w.reshape(rows // 64, 64, -1)   # 64 consecutive input rows share a step
    step = np.abs(groups).max(axis=1) / 7.0
    assert q.dtype == jnp.int8 and q.shape == shape[:n_in - 1] + (shape[n_in - 1] // 2,) + shape[n_in:]
    np.testing.assert_allclose(np.asarray(s).reshape(step.shape), step, rtol=1e-6)
    back = np.asarray(quant.dequantize(q, s, n_in, "int4")).reshape(groups.shape)
    assert np.all(np.abs(back - groups) <= step[:, None, :] / 2 * (1 + 1e-5))
    levels = back / step[:, None, :]   # every value one of the 15 levels -7..7
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
    assert np.abs(np.round(levels)).max() == 7


def test_int4_packs_even_row_low_nibble_odd_row_high():
    w = np.array([[-3.0], [7.0]], np.float32)   # one group, step 1: values -3 and 7
    q, s = quant.quantize(w, 1, "int4")
    assert float(s[0, 0]) == 1.0
    assert np.asarray(q).tolist() == [[0x7D]]   # high nibble 7, low nibble -3 = 0xD
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q, s, 1, "int4")), w)


def _model(mode=None, param_dtype="float32", scan=False):
    lora = dict(LORA, quant=mode) if mode else LORA
    return Llama(llm_config({"llm": dict(LLM, lora=lora, param_dtype=param_dtype), "dtype": "float32",
                             "scan_layers": scan}))


def _init(model):
    ids = jnp.asarray(IDS)
    valid = jnp.ones(ids.shape, bool)
    embeds = jnp.zeros(ids.shape + (LLM["hidden_size"],))
    return nn.meta.unbox(model.init(jax.random.PRNGKey(0), embeds, positions_from_mask(valid), valid))["params"]


@functools.lru_cache
def _stepper(mode):
    """One jitted Adam step on the adapters of the tiny Llama (bf16 LoRA for mode None, else QLoRA `mode`), the base
    an argument, so a run and a zeroed-base check share one compilation: (adapters, base, opt state) -> (adapters,
    opt state, loss before the step, its adapter gradients)."""
    import optax

    model = _model(mode) if mode else _model(param_dtype="bfloat16")
    tx = optax.adam(LR)
    ids = jnp.asarray(IDS)
    valid = jnp.ones(ids.shape, bool)

    def loss(adapters, base):
        p = unflatten({**base, **adapters})
        embeds = model.apply({"params": p}, ids, method=Llama.embed)
        logits = model.apply({"params": p}, embeds, positions_from_mask(valid), valid)[0].astype(jnp.float32)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    @jax.jit
    def step(adapters, base, state):
        value, grads = jax.value_and_grad(loss)(adapters, base)
        updates, state = tx.update(grads, state, adapters)
        return optax.apply_updates(adapters, updates), state, value, grads
    return step, tx


def _run(mode, params, steps):
    """(losses before each of `steps` steps, the first step's adapter gradients)."""
    step, tx = _stepper(mode)
    flat = flatten(params)
    adapters = {k: v for k, v in flat.items() if "/lora_" in k}
    base = {k: v for k, v in flat.items() if k not in adapters}
    state, losses, first = tx.init(adapters), [], None
    for _ in range(steps):
        adapters, state, value, grads = step(adapters, base, state)
        losses.append(float(value))
        first = grads if first is None else first
    return np.asarray(losses), first


@pytest.fixture(scope="module")
def float_params():
    """A tiny LoRA model's fp32 params with non-zero B (so both A and B have gradients)."""
    params = flatten(_init(_model()))
    rng = np.random.default_rng(3)
    for k in params:
        if k.endswith("lora_b"):
            params[k] = jnp.asarray(rng.normal(0, 0.05, params[k].shape), jnp.float32)
    return unflatten(params)


@pytest.fixture(scope="module")
def runs(float_params):
    """STEPS Adam steps from the same adapters over a bf16 base (as lora_stage stores it: adapters fp32, fp32
    compute; key None) and over its int8 / int4 quantisation: {mode: (losses, first step's adapter gradients)}."""
    bf16 = {k: (v if "/lora_" in k else v.astype(jnp.bfloat16)) for k, v in flatten(float_params).items()}
    out = {None: _run(None, unflatten(bf16), STEPS)}
    for mode in ("int8", "int4"):
        out[mode] = _run(mode, quant.quantize_params(float_params, mode), STEPS)
    return out


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_qlora_loss_and_adapter_grads_near_bf16_lora(mode, float_params, runs):
    (ref_losses, ref_grads), (losses, grads) = runs[None], runs[mode]
    loss_err = abs(losses[0] - ref_losses[0]) / abs(ref_losses[0])
    grad_err = max(rel(grads[k], ref_grads[k]) for k in ref_grads)
    keys = sorted(ref_grads)
    global_err = rel(np.concatenate([np.ravel(grads[k]) for k in keys]),
                     np.concatenate([np.ravel(ref_grads[k]) for k in keys]))
    print(f"{mode}: loss rel err {loss_err:.2e}, adapter grads rel err: worst tensor {grad_err:.2e}, "
          f"all together {global_err:.2e}")
    assert set(grads) == set(ref_grads) and len(grads) == 2 * 7 * LLM["num_layers"]
    assert loss_err <= TOL[mode]["loss"] and grad_err <= TOL[mode]["grad"] and global_err <= TOL[mode]["all"]
    # the base matters: with its kernels zeroed the gradients are far off, so the tolerance is not vacuous
    zeroed = {k: (jnp.zeros_like(v) if k.endswith("kernel") else v)
              for k, v in flatten(quant.quantize_params(float_params, mode)).items()}
    _, far = _run(mode, unflatten(zeroed), 1)
    assert max(rel(far[k], ref_grads[k]) for k in ref_grads) > 3 * TOL[mode]["grad"]


def test_short_qlora_training_tracks_bf16_lora(runs):
    """STEPS Adam steps on the adapters over an int8 / int4 base follow the bf16-LoRA run's losses step by step
    within TRAIN_TOL, a band well inside how far the loss falls."""
    ref = runs[None][0]
    assert ref[-1] < (1 - 3 * TRAIN_TOL["int4"]) * ref[0]
    for mode in ("int8", "int4"):
        losses = runs[mode][0]
        gap = np.abs(losses - ref) / ref
        print(f"{mode}: losses {np.round(losses, 4).tolist()} vs bf16 {np.round(ref, 4).tolist()}; worst step's "
              f"relative gap {gap.max():.2e}")
        assert gap.max() <= TRAIN_TOL[mode], mode


def _base_bytes(params):
    """Bytes of the adapted layers' base (kernel and its scales)."""
    return sum(v.size * v.dtype.itemsize for k, v in flatten(params).items()
               if k.rsplit("/", 1)[-1] in ("kernel", "kernel_scale") and "/lm_head" not in k
               and "embed" not in k)


@pytest.mark.parametrize("mode, ratio", [("int8", 1.85), ("int4", 3.5)])
def test_quantised_tree_holds_int8_base_and_is_smaller(mode, ratio):
    """A QLoRA model (scanned layers) initialises its adapted kernels as int8 values + float32 scales, and
    quantize_params on the float tree gives the same layout. Expected ratios vs bf16 at in-dim 64: int8
    2 / (1 + 4/64) = 1.88, int4 2 / (0.5 + 4/64) = 3.56 (at 7B's in-dim 4096 int8 reaches 2.0; int4 stays 3.56)."""
    q_abs = flatten(jax.eval_shape(lambda: _init(_model(mode, scan=True))))
    f_abs = flatten(jax.eval_shape(lambda: _init(_model(param_dtype="bfloat16", scan=True))))
    from_float = flatten(jax.eval_shape(lambda: quant.quantize_params(_init(_model(scan=True)), mode)))
    adapted = [k[:-len("lora_a")] for k in q_abs if k.endswith("lora_a")]
    assert len(adapted) == 7
    for p in adapted:
        assert q_abs[p + "kernel"].dtype == jnp.int8 and q_abs[p + "kernel_scale"].dtype == jnp.float32
        assert (q_abs[p + "kernel"].shape, q_abs[p + "kernel_scale"].shape) == (
            from_float[p + "kernel"].shape, from_float[p + "kernel_scale"].shape)
        assert from_float[p + "kernel"].dtype == jnp.int8
    assert _base_bytes(f_abs) / _base_bytes(q_abs) >= ratio


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_float_checkpoint_quantised_on_load(mode, float_params):
    """overlay_checkpoints' hook: a float (on-disk) tree meets the quantised model tree."""
    model_flat = flatten(quant.quantize_params(float_params, mode))
    loaded = quant.quantize_loaded({k: np.asarray(v) for k, v in flatten(float_params).items()}, model_flat)
    assert set(loaded) == set(model_flat)
    for k, v in model_flat.items():
        np.testing.assert_array_equal(loaded[k], np.asarray(v))


def test_qlora_stage_freezes_the_quantised_base():
    """configs/llava15.py:7b_qlora's rules on the tiny VLM: only adapters and the projector train; the int8 base gets
    no optimizer state."""
    from uhd_jax.configs import common, llava15
    from uhd_jax.models.config import vlm_config
    from uhd_jax.models.vlm import VLM, example_inputs
    from uhd_jax.train.trainer import stage_model

    assert llava15.get_config("7b_qlora").stages.sft.lora.quant == "int4"
    c = llava15.get_config("tiny")
    common.lora_stage(c.stages.sft, dict(rank=4, alpha=8.0, dropout=0.0), lr=1e-2, quant="int4")
    cfg = vlm_config(stage_model(c, c.stages.sft))
    assert cfg.llm.lora.quant == "int4"
    abstract = nn.meta.unbox(jax.eval_shape(VLM(cfg).init, jax.random.PRNGKey(0), *example_inputs(cfg))["params"])
    opt.check_rules(abstract, c.stages.sft.trainable, c.stages.sft.lrs)
    labels = opt.group_labels(abstract, c.stages.sft.trainable)
    flat_labels = flatten(labels)
    assert {k for k, g in flat_labels.items() if g != opt.FROZEN} == {
        k for k in flat_labels if "/lora_" in k or k.startswith("projector/")}
    quantised = [k for k, v in flatten(abstract).items() if v.dtype == jnp.int8]
    assert quantised and all(flat_labels[k] == opt.FROZEN for k in quantised)
    trainable, _ = opt.split_trainable(abstract, labels)
    tx, _ = opt.make_optimizer(opt.trainable_labels(labels), dict(c.stages.sft.lrs), total_steps=10,
                               warmup_ratio=0.0)
    state = jax.eval_shape(tx.init, trainable)
    n_trained = sum(v.size for v in flatten(trainable).values() if v is not None)
    n_state = sum(x.size for x in jax.tree_util.tree_leaves(state) if x.ndim > 0)
    assert n_state == 2 * n_trained and not any(x.dtype == jnp.int8 for x in jax.tree_util.tree_leaves(state))


def test_float_checkpoint_loads_into_a_scanned_sharded_qlora_model(tmp_path):
    """The trainer's path: a float checkpoint (the normal on-disk layout, unscanned) overlaid onto a QLoRA stage's
    scanned model on a 2x2x2 mesh holds the checkpoint's kernels quantised, sharded as the float base would be."""
    from uhd_jax.config_loading import load_config
    from uhd_jax.configs import common
    from uhd_jax.models.vlm import init_fn
    from uhd_jax.parallel.mesh import make_mesh
    from uhd_jax.parallel.sharding import DEFAULT_RULES, init_sharded
    from uhd_jax.train.checkpoints import save_params
    from uhd_jax.train.trainer import model_for_stage, overlay_checkpoints

    c = load_config("configs/llava15.py:tiny")
    float_init = jax.jit(init_fn(model_for_stage(c, c.stages.sft)))
    float_params = nn.meta.unbox(float_init(jax.random.PRNGKey(1))["params"])
    save_params(str(tmp_path / "ckpt"), float_params, {"model": c.model.to_dict()})
    c.model.scan_layers = True
    common.lora_stage(c.stages.sft, dict(rank=4, alpha=8.0), lr=1e-2, quant="int4")
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    variables, shardings = init_sharded(init_fn(model_for_stage(c, c.stages.sft)), mesh, DEFAULT_RULES,
                                        jax.random.PRNGKey(0))
    flat = flatten(overlay_checkpoints(variables["params"], shardings["params"], [str(tmp_path / "ckpt")], True))
    src = flatten(float_params)
    for name, n_in in (("attn/q", 1), ("attn/o", 2), ("down", 1)):
        q, s = quant.quantize(src[f"llm/layers_1/{name}/kernel"], n_in, "int4")
        np.testing.assert_array_equal(np.asarray(flat[f"llm/layers/{name}/kernel"][1]), np.asarray(q))
        np.testing.assert_array_equal(np.asarray(flat[f"llm/layers/{name}/kernel_scale"][1]), np.asarray(s))
    assert flat["llm/layers/attn/q/kernel"].sharding.spec[1:] == ("fsdp", "tensor", None)


@pytest.fixture(scope="module", params=["int8", "int4"])
def qlora_checkpoint(request, tmp_path_factory):
    """A QLoRA stage's final checkpoint as the trainer writes it: the tiny LLaVA's adapted kernels as int8 (or packed
    int4) values + float32 scales, adapters fp32 with non-zero B, model.llm.lora.quant recorded; with its tokenizer."""
    from tests.convert_helpers import llama_style, random_checkpoint
    from uhd_jax.train.checkpoints import load_meta, load_params, save_params

    mode = request.param
    root = tmp_path_factory.mktemp(f"qlora_{mode}")
    lora = dict(rank=4, alpha=8.0, dropout=0.05, targets=["q", "k", "v", "o", "gate", "up", "down"])
    tok = llama_style(str(root / "tokenizer"), 128)
    src = random_checkpoint(root / "float", "configs/llava15.py:tiny", dict(lora=lora), seed=4, tokenizer=tok)
    flat = {k: np.asarray(v) for k, v in flatten(load_params(src)).items()}
    for k in flat:   # adapters of a trained size (the random ones are 0.2-scale normals: too large for int4 tests)
        if "/lora_" in k:
            flat[k] = flat[k] * 0.25
    meta = load_meta(src)
    meta["model"]["llm"]["lora"] = dict(lora, quant=mode)
    ckpt = str(root / "qlora")
    save_params(ckpt, jax.device_get(jax.jit(lambda p: quant.quantize_params(p, mode))(unflatten(flat))), meta)
    return mode, ckpt, meta["model"]


def _qlora_logits(model_dict, params):
    """Our QLoRA LLM's logits: adapters applied on the fly over the dequantised base (fp32 compute)."""
    model = Llama(llm_config(dict(model_dict, dtype="float32")))
    ids = jnp.asarray(IDS)
    valid = jnp.ones(ids.shape, bool)

    @jax.jit
    def logits(p):
        embeds = model.apply({"params": p}, ids, method=Llama.embed)
        return model.apply({"params": p}, embeds, positions_from_mask(valid), valid)[0]
    return np.asarray(logits(params["llm"]))


def test_qlora_checkpoint_exports_to_every_format_and_as_a_peft_adapter(qlora_checkpoint, tmp_path, capsys):
    """`uhd-convert export` dequantises the base (a note says so): merged, transformers alone gives our QLoRA model's
    logits; `--adapters drop` + `export-lora` reload in peft with the same logits; every other format writes the
    same merged weights (the LLM of llava_hf / llava_original equals hf_llama's bit for bit)."""
    import torch
    import transformers
    from safetensors.numpy import load_file

    from tests.torch_helpers import rel_err
    from uhd_jax.convert.cli import main
    from uhd_jax.convert.exporter import FORMATS
    from uhd_jax.train.checkpoints import load_params

    peft = pytest.importorskip("peft")
    mode, ckpt, model = qlora_checkpoint
    # the layout of a QLoRA stage's model (what the trainer saves): names, shapes and dtypes
    from uhd_jax.models.vlm import init_fn
    from uhd_jax.models.config import vlm_config

    abstract = flatten(nn.meta.unbox(jax.eval_shape(init_fn(vlm_config(model)), jax.random.PRNGKey(0))["params"]))
    stored = flatten(load_params(ckpt))
    assert {k: (v.shape, v.dtype) for k, v in abstract.items()} == {k: (v.shape, v.dtype) for k, v in stored.items()}
    assert stored["llm/layers_0/attn/q/kernel"].dtype == np.int8
    ours = _qlora_logits(model, unflatten(stored))
    ids = torch.from_numpy(IDS.astype(np.int64))
    for fmt in sorted(FORMATS):
        capsys.readouterr()
        assert main(["export", "--checkpoint", ckpt, "--format", fmt, "--out", str(tmp_path / fmt)]) == 0, fmt
        printed = capsys.readouterr().out
        assert f"note: the {mode} QLoRA base dequantised to float" in printed, (fmt, printed)
    with torch.no_grad():
        merged = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf_llama")).eval()
        assert rel_err(merged(input_ids=ids).logits.numpy(), ours) <= 1e-5

    def llm_tensors(fmt, prefix):
        files = [f for f in os.listdir(tmp_path / fmt) if f.endswith(".safetensors")]
        out = {}
        for f in files:
            out.update({k[len(prefix):]: v for k, v in load_file(str(tmp_path / fmt / f)).items()
                        if k.startswith(prefix)})
        return out

    reference = llm_tensors("hf_llama", "model.layers.")
    assert len(reference) == 2 * 9
    for fmt, prefix in (("llava_original", "model.layers."), ("llava_hf", "language_model.model.layers.")):
        got = llm_tensors(fmt, prefix)
        assert sorted(got) == sorted(reference) and all(np.array_equal(got[k], reference[k]) for k in got), fmt
    assert os.listdir(tmp_path / "mm_projector") == ["mm_projector.bin"]
    assert "model.safetensors" in os.listdir(tmp_path / "hf_clip")

    assert main(["export", "--checkpoint", ckpt, "--format", "hf_llama", "--adapters", "drop",
                 "--out", str(tmp_path / "base")]) == 0
    assert main(["export-lora", "--checkpoint", ckpt, "--format", "hf_llama", "--out", str(tmp_path / "peft")]) == 0
    with torch.no_grad():
        base = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "base")).eval()
        assert rel_err(base(input_ids=ids).logits.numpy(), ours) > 1e-3   # the adapters matter
        reloaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
        assert rel_err(reloaded(input_ids=ids).logits.numpy(), ours) <= 1e-5


