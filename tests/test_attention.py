"""Attention without (T, S) masks: the kernels (chunked CPU einsum, Pallas TPU flash in interpret mode) against
XLA's masked attention, `attention_impl='auto'` per platform, the LLM on right-padded, left-padded and holed rows
(SliME's routed-out tokens) and through prefill + per-row cached decoding against each sequence alone, and an audit
that no LLaVA-1.5 train step or generation hands a (T, S) mask to the attention entry point."""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.attention_helpers import assert_no_dense_masks, recorded_attention_calls
from tests.torch_helpers import rel_err
from uhd_jax.config_loading import load_config
from uhd_jax.models import layers
from uhd_jax.models.llama import Llama, LlamaConfig, init_cache, positions_from_mask

TINY = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   max_position_embeddings=512)


def qkv(b, t, s, n, kv, d, seed=0):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.standard_normal(shape), jnp.float32)
                 for shape in ((b, t, n, d), (b, s, kv, d), (b, s, kv, d)))


def masked_reference(q, k, v, lengths, causal):
    """The dense form the LLM used before: a (B, 1, T, S) boolean mask into XLA's attention."""
    t, s = q.shape[1], k.shape[1]
    keep = jnp.arange(s)[None, None, :] < lengths[:, None, None]
    if causal:
        keep = keep & (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None])[None]
    return jax.nn.dot_product_attention(q, k, v, mask=keep[:, None], implementation="xla")


def real_rows(x, lengths):
    return np.concatenate([np.asarray(x[i, :n]) for i, n in enumerate(lengths)])


@pytest.mark.parametrize("impl", ["chunked", "xla"])
def test_causal_attention_with_lengths_equals_the_masked_form(impl):
    q, k, v = qkv(3, 150, 150, 4, 2, 16)       # 150: three query blocks of the chunked kernel, the last one short
    lengths = jnp.asarray([150, 97, 1], jnp.int32)
    got = jax.jit(functools.partial(layers.dot_product_attention, is_causal=True, implementation=impl))(
        q, k, v, q_lengths=lengths, kv_lengths=lengths)
    assert rel_err(real_rows(got, [150, 97, 1]), real_rows(masked_reference(q, k, v, lengths, True),
                                                           [150, 97, 1])) <= 1e-5
    assert bool(jnp.all(jnp.isfinite(got)))   # padding queries too: their gradients meet a zero loss weight


@pytest.mark.parametrize("impl", ["chunked", "xla"])
def test_one_query_over_a_cache_by_lengths_equals_the_masked_form(impl):
    q, k, v = qkv(3, 1, 40, 4, 2, 16, seed=1)
    lengths = jnp.asarray([40, 13, 1], jnp.int32)
    got = jax.jit(functools.partial(layers.dot_product_attention, implementation=impl))(q, k, v, kv_lengths=lengths)
    assert rel_err(got, masked_reference(q, k, v, lengths, False)) <= 1e-5


def test_pallas_tpu_flash_kernel_in_interpret_mode_equals_the_masked_form():
    from jax.experimental.pallas import tpu as pltpu

    from uhd_jax.models.pallas_attention import tpu_flash_attention

    q, k, v = qkv(2, 128, 128, 2, 1, 16, seed=2)
    lengths = jnp.asarray([128, 45], jnp.int32)
    with pltpu.force_tpu_interpret_mode():
        got = tpu_flash_attention(q, k, v, is_causal=True, kv_lengths=lengths)
    assert rel_err(real_rows(got, [128, 45]), real_rows(masked_reference(q, k, v, lengths, True), [128, 45])) <= 1e-5
    assert bool(jnp.all(jnp.isfinite(got)))


def test_auto_picks_flash_kernels_where_they_fit_and_xla_elsewhere():
    pick = functools.partial(layers.resolve_attention_impl, "auto", head_dim=64, q_len=256, kv_len=256,
                             is_causal=True, has_mask=False)
    assert pick(dtype=jnp.bfloat16, platform="gpu") == "cudnn"
    assert pick(dtype=jnp.float32, platform="gpu") == "xla"           # cuDNN's flash kernel is bf16/fp16 only
    assert layers.resolve_attention_impl("auto", dtype=jnp.bfloat16, head_dim=64, q_len=1, kv_len=300,
                                         is_causal=False, has_mask=False, platform="gpu") == "xla"   # decoding
    assert pick(dtype=jnp.bfloat16, platform="tpu") == "pallas"
    assert pick(dtype=jnp.float32, platform="cpu") == "chunked"
    assert layers.resolve_attention_impl("auto", dtype=jnp.bfloat16, head_dim=64, q_len=1, kv_len=300,
                                         is_causal=False, has_mask=False, platform="tpu") == "xla"
    assert layers.resolve_attention_impl("auto", dtype=jnp.bfloat16, head_dim=64, q_len=256, kv_len=256,
                                         is_causal=False, has_mask=True, platform="gpu") == "xla"
    assert pick(dtype=jnp.float32) == "chunked"   # this machine (the tests run on CPU)
    assert layers.resolve_attention_impl(None, dtype=jnp.float32, head_dim=64, q_len=8, kv_len=8, is_causal=True,
                                         has_mask=False) == "xla"
    with pytest.raises(ValueError, match="unknown attention_impl 'flash'"):
        layers.resolve_attention_impl("flash", dtype=jnp.float32, head_dim=64, q_len=8, kv_len=8, is_causal=True,
                                      has_mask=False)


@pytest.fixture(scope="module")
def tiny_llm():
    model = Llama(TINY)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4, 32)), jnp.zeros((1, 4), jnp.int32),
                                 jnp.ones((1, 4), bool))
    return model, params


@functools.partial(jax.jit, static_argnames="impl")
def _logits(params, ids, valid, impl):
    model = Llama(dataclasses.replace(TINY, attention_impl=impl))
    embeds = model.apply(params, ids, method=Llama.embed)
    return model.apply(params, embeds, positions_from_mask(valid), valid)[0]


def llm_logits(model, params, ids, valid, impl="auto"):
    return _logits(params, jnp.asarray(ids), jnp.asarray(valid), impl)


def alone(model, params, seq, impl="auto"):
    return np.asarray(llm_logits(model, params, np.asarray(seq)[None], np.ones((1, len(seq)), bool), impl)[0])


@pytest.mark.parametrize("impl", ["auto", "xla"])
def test_llm_on_right_and_left_padded_rows_equals_each_row_alone(tiny_llm, impl):
    model, params = tiny_llm
    r = np.random.default_rng(3)
    t, lengths = 72, (72, 40, 5)    # 72: two query blocks of the chunked kernel
    seqs = [r.integers(3, 96, n) for n in lengths]
    for left in (False, True):
        ids, valid = np.zeros((3, t), np.int32), np.zeros((3, t), bool)
        for i, s in enumerate(seqs):
            cols = slice(t - len(s), t) if left else slice(0, len(s))
            ids[i, cols], valid[i, cols] = s, True
        got = np.asarray(llm_logits(model, params, ids, valid, impl))
        assert np.isfinite(got).all()
        for i, s in enumerate(seqs):
            assert rel_err(got[i][valid[i]], alone(model, params, s, impl)) <= 1e-5


def test_llm_with_dropped_tokens_equals_the_packed_shorter_row(tiny_llm):
    """SliME's router drops image tokens by marking them invalid: each kept token must get what the original's
    packed sequence (the dropped tokens removed) gives it."""
    model, params = tiny_llm
    r = np.random.default_rng(4)
    ids = r.integers(3, 96, (2, 72)).astype(np.int32)
    valid = np.ones((2, 72), bool)
    valid[0, 10:40:2] = False        # holes in the middle: 57 tokens kept
    valid[1, 5:69] = np.arange(64) % 8 < 3
    valid[1, 69:] = False            # and right padding: 29 kept
    got = np.asarray(llm_logits(model, params, ids, valid))
    for i in range(2):
        assert rel_err(got[i][valid[i]], alone(model, params, ids[i][valid[i]])) <= 1e-5


def test_prefill_then_per_row_decoding_equals_each_sequence_alone(tiny_llm):
    """Ragged left-padded prompts: the prefill packs each row from cache slot 0, every step writes at the row's own
    length, and each step's logits are those of the row's whole sequence run alone."""
    model, params = tiny_llm
    r = np.random.default_rng(5)
    lengths, t, steps = (9, 4, 12), 12, 2
    seqs = [r.integers(3, 96, n + steps) for n in lengths]
    ids, valid = np.zeros((3, t), np.int32), np.zeros((3, t), bool)
    for i, (s, n) in enumerate(zip(seqs, lengths)):
        ids[i, t - n:], valid[i, t - n:] = s[:n], True
    @jax.jit
    def run(ids, positions, valid, cache):
        return model.apply(params, model.apply(params, ids, method=Llama.embed), positions, valid, cache=cache)

    cache = init_cache(model.cfg, 3, t + steps)
    valid_j = jnp.asarray(valid)
    logits, cache = run(jnp.asarray(ids), positions_from_mask(valid_j), valid_j, cache)
    assert cache.lengths.tolist() == list(lengths)
    got = [[np.asarray(logits[i])[valid[i]]] for i in range(3)]
    for j in range(steps):
        tokens = np.asarray([[s[n + j]] for s, n in zip(seqs, lengths)], np.int32)
        pos = jnp.asarray([[n + j] for n in lengths], jnp.int32)
        logits, cache = run(jnp.asarray(tokens), pos, jnp.ones((3, 1), bool), cache)
        for i in range(3):
            got[i].append(np.asarray(logits[i]))
    assert cache.lengths.tolist() == [n + steps for n in lengths]
    for i, s in enumerate(seqs):
        assert rel_err(np.concatenate(got[i]), alone(model, params, s)) <= 1e-5


def abstract(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def test_llava15_train_step_and_generation_hand_no_dense_mask_to_attention():
    from uhd_jax.eval.decoding import GenerationConfig
    from uhd_jax.eval.generate import generate_tokens
    from uhd_jax.models.vlm import VLM, init_fn
    from uhd_jax.train import optimizer as opt
    from uhd_jax.train.state import TrainState
    from uhd_jax.train.step import make_train_step
    from uhd_jax.train.trainer import model_for_stage

    c = load_config("configs/llava15.py:tiny")
    cfg = model_for_stage(c, c.stages.sft)
    params = nn.meta.unbox(jax.eval_shape(init_fn(cfg), jax.random.PRNGKey(0))["params"])
    labels = opt.group_labels(params, [("vision/.*", "frozen"), (".*", "rest")])
    tx = optax.multi_transform({"rest": optax.sgd(1.0)}, opt.trainable_labels(labels))
    split = lambda ps: opt.split_trainable(ps, labels)  # noqa: E731
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(tx.init, split(params)[0]))
    b, t = 2, 40
    size = cfg.vision.image_size
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    batch = {"input_ids": spec((1, b, t), jnp.int32), "targets": spec((1, b, t), jnp.int32),
             "loss_mask": spec((1, b, t), bool), "token_valid": spec((1, b, t), bool),
             "positions": spec((1, b, t), jnp.int32), "pixel_values": spec((1, b, 1, size, size, 3), jnp.float32),
             "image_token_map": spec((1, b, t), jnp.int32)}
    with recorded_attention_calls() as calls:
        jax.eval_shape(make_train_step(VLM(cfg), tx, split), state, batch)
    assert_no_dense_masks(calls)
    llm_calls = [call for call in calls if call.q_shape[1] == t]
    assert llm_calls and all(call.is_causal and call.has_lengths for call in llm_calls)

    gen = GenerationConfig(max_new_tokens=3)
    with recorded_attention_calls() as calls:
        jax.eval_shape(lambda *a: generate_tokens(*a[:1], cfg, *a[1:], gen), params, spec((b, t), jnp.int32),
                       spec((b, t), bool), spec((b, 1, size, size, 3), jnp.float32), spec((b, t), jnp.int32),
                       jax.eval_shape(lambda: jax.random.split(jax.random.PRNGKey(0), b)))
    assert_no_dense_masks(calls)
    decode_calls = [call for call in calls if call.q_shape[1] == 1]
    assert decode_calls and all(call.has_lengths and call.k_shape[1] == t + 3 for call in decode_calls)
