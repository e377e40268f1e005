"""The train step's memory: the loss in token chunks (no (B, L, V) logits), remat by name, and what XLA's analysis
of the compiled step says about them at tiny sizes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from uhd_jax.config_loading import load_config
from uhd_jax.models.vlm import VLM, init_fn
from uhd_jax.perf.memory import cpu_upcast_bytes
from uhd_jax.perf.train_memory import step_memory
from uhd_jax.train import optimizer as opt
from uhd_jax.train.state import TrainState
from uhd_jax.train.step import argmax_hits, loss_chunk_tokens, make_train_step, model_inputs
from uhd_jax.train.trainer import model_for_stage

B, L = 3, 20
# XLA options for the compiles that are only analysed: without LLVM's optimisation a tiny step compiles in about half
# the time on a CPU, and buffer assignment (what the memory tests read) does not depend on it.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def tiny_config(llm=None, **model):
    """llava15:tiny with a one-layer vision tower (frozen in SFT: no memory test depends on its depth), its LLM sizes
    updated by `llm`, its model by `model`."""
    c = load_config("configs/llava15.py:tiny")
    c.model.update(dict(model, llm=dict(c.model.llm.to_dict(), **(llm or {})),
                        vision=dict(c.model.vision.to_dict(), num_layers=1)))
    return c


@pytest.fixture(scope="module")
def tiny():
    c = load_config("configs/llava15.py:tiny")
    cfg = model_for_stage(c, c.stages.sft)
    params = nn.meta.unbox(init_fn(cfg)(jax.random.PRNGKey(0))["params"])
    labels = opt.group_labels(params, [("vision/.*", "frozen"), (".*", "rest")])
    rng = np.random.default_rng(1)
    batch = {"input_ids": rng.integers(3, 120, (B, L)).astype(np.int32),
             "targets": rng.integers(0, cfg.llm.vocab_size, (B, L)).astype(np.int32),
             "loss_mask": rng.random((B, L)) < 0.6, "token_valid": np.ones((B, L), bool),
             "positions": np.broadcast_to(np.arange(L), (B, L)).astype(np.int32),
             "pixel_values": rng.normal(size=(B, 1, 56, 56, 3)).astype(np.float32),
             "image_token_map": np.tile(np.r_[np.arange(16), -np.ones(L - 16, int)], (B, 1)).astype(np.int32)}
    model = VLM(cfg)
    # eager, op by op: no fusion shared with the jitted step under test
    want = jax.value_and_grad(lambda p: reference_loss(model, p, batch))(params)
    return model, params, labels, batch, want


def reference_loss(model, params, batch):
    """Masked mean cross-entropy from the model's full (B, L, V) logits and optax's cross-entropy."""
    logits, _ = model.apply({"params": params}, *model_inputs(batch))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(ce * mask) / jnp.sum(mask)


@pytest.mark.parametrize("chunk", [7, 60])   # padded chunks; one chunk for the whole batch
def test_chunked_loss_and_its_update_equal_the_full_logits_loss(tiny, chunk):
    model, params, labels, batch, (want_loss, want_grads) = tiny
    tx = optax.multi_transform({"rest": optax.sgd(1.0)}, opt.trainable_labels(labels))
    split = lambda ps: opt.split_trainable(ps, labels)  # noqa: E731
    state = TrainState(jnp.int32(0), params, tx.init(split(params)[0]))
    stacked = {k: v[None] for k, v in batch.items()}
    new, metrics = jax.jit(make_train_step(model, tx, split, loss_chunk=chunk))(state, stacked)

    np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-6)
    assert float(metrics["tokens"]) == batch["loss_mask"].sum()
    logits, _ = model.apply({"params": params}, *model_inputs(batch))
    hits = (np.argmax(np.asarray(logits), -1) == batch["targets"]) & batch["loss_mask"]
    np.testing.assert_allclose(metrics["accuracy"], hits.sum() / batch["loss_mask"].sum(), rtol=1e-6)
    # SGD at rate 1: every trained parameter moved by exactly minus its gradient; the frozen tower did not move.
    moved = jax.tree_util.tree_map(lambda a, b: a - b, params, new.params)
    for path, g in jax.tree_util.tree_flatten_with_path(want_grads)[0]:
        name = jax.tree_util.keystr(path)
        got = dict(jax.tree_util.tree_flatten_with_path(moved)[0])[path]
        if "vision" in name:
            assert not np.any(got), name
        else:
            np.testing.assert_allclose(got, g, rtol=1e-5, atol=1e-7, err_msg=name)


def test_argmax_hits_follow_argmax_and_its_tie_rule():
    rng = np.random.default_rng(0)
    logits = rng.integers(-3, 3, (256, 9)).astype(np.float32)    # few values: most rows hold ties for their max
    logits[0] = 1.5
    targets = rng.integers(0, 9, 256).astype(np.int32)
    targets[:64] = np.argmax(logits[:64], -1)                      # hits, many of them tied with later indices
    want = np.argmax(logits, -1) == targets
    assert 64 <= want.sum() < 256
    assert (np.asarray(jax.jit(argmax_hits)(logits, targets)) == want).all()


def test_loss_chunk_size_follows_the_vocabulary():
    assert loss_chunk_tokens(32000, 32768) == 2097       # 2097 x 32000 x 4 bytes <= 256 MiB
    assert loss_chunk_tokens(1024, 4096) == 4096         # a small vocabulary: one chunk
    assert loss_chunk_tokens(32000, 32768, chunk=512) == 512


MESH = dict(data=1, fsdp=1, tensor=1)
PER_DEVICE, LENGTH, CHUNK = 4, 256, 32


def step_temporaries(remat: str, accum: int = 1, chunk: int = CHUNK) -> dict:
    """The memory analysis of llava15:tiny's SFT step with 4 scanned LLM layers and an 8192-word vocabulary, for 4
    sequences of 256 tokens. Attention through XLA's kernel, whose (B, H, T, T) scores the remat and micro-batch
    savings below are sized by: the CPU's own attention (`auto`) already keeps one batch row's scores at a time."""
    c = tiny_config(dict(vocab_size=8192, num_layers=4), scan_layers=True, remat_policy=remat, attention_impl="xla")
    return step_memory(c, "sft", PER_DEVICE, LENGTH, MESH, accum=accum, loss_chunk=chunk,
                       compiler_options=FAST_COMPILE)


@pytest.fixture(scope="module")
def chunked_remat():
    """The reference point of each memory test: whole-layer remat, 32-token loss chunks, no accumulation."""
    return step_temporaries("nothing_saveable")


def test_chunked_loss_lowers_the_compiled_steps_temporaries(chunked_remat):
    one_chunk = step_temporaries("nothing_saveable", chunk=PER_DEVICE * LENGTH)
    # 1024 tokens x 8192 words x 4 bytes = 32 MiB of logits, kept with their gradient; 32-token chunks hold 1 MiB.
    assert chunked_remat["temp_bytes"] < 0.5 * one_chunk["temp_bytes"], (chunked_remat, one_chunk)


def test_remat_and_micro_batches_lower_the_compiled_steps_temporaries(chunked_remat):
    kept = step_temporaries("none")
    # kept: every layer's attention scores (4 x 4 heads x 256 x 256 x 4 bytes = 4 MiB) and MLP activations
    assert chunked_remat["temp_bytes"] < 0.6 * kept["temp_bytes"], (chunked_remat, kept)
    # the same sequences in 4 micro-batches of 1: a quarter of the activations live at once
    micro = step_temporaries("nothing_saveable", accum=PER_DEVICE)
    assert micro["temp_bytes"] < 0.6 * chunked_remat["temp_bytes"], (micro, chunked_remat)


def test_cpu_upcast_counts_the_float32_copies_of_stacked_bf16_weights():
    c = tiny_config(scan_layers=True)
    c.stages.sft.model = dict(llm=dict(param_dtype="bfloat16"))
    c.model.dtype = "bfloat16"
    out = step_memory(c, "sft", 2, 64, MESH, compiler_options=FAST_COMPILE)
    llm = c.model.llm
    e, m, layers, heads, kv = llm.hidden_size, llm.intermediate_size, llm.num_layers, llm.num_heads, llm.num_kv_heads
    d = e // heads
    stacked = layers * (e * heads * d * 2 + e * kv * d * 2 + 3 * e * m)   # q, o, k, v, gate, up, down kernels
    # every stacked kernel is copied to float32 once; at most every bf16 argument is
    assert 4 * stacked <= out["cpu_upcast_bytes"] <= 2 * out["argument_bytes"], out
    assert cpu_upcast_bytes("HloModule m\n\nENTRY %main () -> f32[] {\n}\n") == 0
