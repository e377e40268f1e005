"""Decoding against transformers' `generate()` (greedy and beam search on a left-padded batch), batch invariance,
KV-cache decoding against full recomputation, sampling's nucleus, EOS and stop sequences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.test_llama import convert
from tests.torch_helpers import tiny_llama
from uhd_jax.eval.decoding import GenerationConfig, beam_search, decode, top_p_filter
from uhd_jax.models.llama import Llama, positions_from_mask


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    ref = tiny_llama(seed=6, pad_token_id=0)
    model, params, _ = convert(ref, tmp_path_factory.mktemp("llama"))
    return ref, model, params


def left_padded(lengths, seed=3):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 128, size=n) for n in lengths]
    t = max(lengths)
    ids, mask = np.zeros((len(prompts), t), np.int64), np.zeros((len(prompts), t), np.int64)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):], mask[i, t - len(p):] = p, 1
    return prompts, ids, mask


def ours(model, params, ids, mask, gen, seed=0):
    embeds = model.apply(params, jnp.asarray(ids), method=Llama.embed)
    keys = jax.random.split(jax.random.PRNGKey(seed), ids.shape[0])
    return np.asarray(decode(params, model.cfg, embeds, jnp.asarray(mask.astype(bool)), keys, gen))


def hf(ref, ids, mask, **kw):
    with torch.no_grad():
        out = ref.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
                           pad_token_id=0, **kw).numpy()[:, ids.shape[1]:]
    return out


def padded_to(tokens, n, pad=0):
    return np.pad(tokens, ((0, 0), (0, n - tokens.shape[1])), constant_values=pad)


@pytest.mark.parametrize("scan", [False, True])
def test_greedy_matches_transformers_and_each_prompt_alone(scan, tmp_path):
    ref = tiny_llama(seed=6, pad_token_id=0)
    model, params, _ = convert(ref, tmp_path, scan=scan)
    prompts, ids, mask = left_padded((5, 9, 7))
    gen = GenerationConfig(max_new_tokens=12)
    expected = hf(ref, ids, mask, max_new_tokens=12, eos_token_id=None)
    np.testing.assert_array_equal(ours(model, params, ids, mask, gen), expected)
    for i, p in enumerate(prompts):
        alone = ours(model, params, p[None], np.ones((1, len(p)), np.int64), gen)
        np.testing.assert_array_equal(alone[0], expected[i])


def test_kv_cache_decoding_equals_full_recomputation(llama):
    """Each generated token is the argmax of a from-scratch forward over the prompt and the tokens before it."""
    _, model, params = llama
    _, ids, mask = left_padded((4, 8))
    new = ours(model, params, ids, mask, GenerationConfig(max_new_tokens=10))
    full_ids = np.concatenate([ids, new], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(new)], axis=1).astype(bool)
    embeds = model.apply(params, jnp.asarray(full_ids), method=Llama.embed)
    logits, _ = model.apply(params, embeds, positions_from_mask(jnp.asarray(full_mask)), jnp.asarray(full_mask))
    t = ids.shape[1]
    recomputed = np.asarray(jnp.argmax(logits[:, t - 1:-1], axis=-1))
    np.testing.assert_array_equal(recomputed, new)


def test_eos_stops_a_row_and_pads_it(llama):
    _, model, params = llama
    _, ids, mask = left_padded((6, 6), seed=4)
    free = ours(model, params, ids, mask, GenerationConfig(max_new_tokens=8))
    eos = int(free[0, 2])  # pretend row 0's third token is EOS
    stopped = ours(model, params, ids, mask, GenerationConfig(max_new_tokens=8, eos_id=eos, pad_id=0))
    for row in range(2):
        hits = np.flatnonzero(free[row] == eos)
        end = hits[0] if len(hits) else 8
        np.testing.assert_array_equal(stopped[row, :end + 1], free[row, :end + 1])
        assert (stopped[row, end + 1:] == 0).all()


def test_stop_sequence_ends_the_row(llama):
    _, model, params = llama
    _, ids, mask = left_padded((6,), seed=5)
    free = ours(model, params, ids, mask, GenerationConfig(max_new_tokens=9))[0]
    seq = (int(free[3]), int(free[4]))
    stopped = ours(model, params, ids, mask, GenerationConfig(max_new_tokens=9, stop_sequences=(seq, (1, 2, 3)),
                                                            pad_id=0))[0]
    first = next(i for i in range(1, 9) if (free[i - 1], free[i]) == seq)
    np.testing.assert_array_equal(stopped[:first + 1], free[:first + 1])
    assert (stopped[first + 1:] == 0).all()


@pytest.mark.parametrize("with_eos", [False, True])
def test_beam_search_matches_transformers(llama, with_eos):
    ref, model, params = llama
    _, ids, mask = left_padded((5, 9, 7), seed=7)
    kw = {}
    if with_eos:  # an id the beams actually produce, so hypotheses end early and the stopping rule matters
        free = ours(model, params, ids, mask, GenerationConfig(max_new_tokens=10, num_beams=3))
        kw = dict(eos_id=int(free[0, 3]))
    for beams, penalty in ((3, 1.0), (4, 0.0)):
        gen = GenerationConfig(max_new_tokens=10, num_beams=beams, length_penalty=penalty, **kw)
        expected = hf(ref, ids, mask, max_new_tokens=10, num_beams=beams, length_penalty=penalty,
                      eos_token_id=kw.get("eos_id"))
        got = ours(model, params, ids, mask, gen)
        expected = padded_to(expected, 10)
        if with_eos:   # HF fills after EOS with EOS here (its fill is `pad_token_id or eos`, and pad 0 is falsy)
            after = np.cumsum(expected == kw["eos_id"], axis=1) - (expected == kw["eos_id"]) > 0
            assert (got[after] == 0).all()
            expected = np.where(after, 0, expected)
        np.testing.assert_array_equal(got, expected)
        if with_eos:
            assert (got == kw["eos_id"]).any(), "the chosen EOS never ended a hypothesis: the test lost its point"


def test_one_beam_equals_greedy(llama):
    _, model, params = llama
    _, ids, mask = left_padded((5, 9, 7), seed=8)
    embeds = model.apply(params, jnp.asarray(ids), method=Llama.embed)
    one = beam_search(params, model.cfg, embeds, jnp.asarray(mask.astype(bool)), GenerationConfig(max_new_tokens=10))
    np.testing.assert_array_equal(np.asarray(one), ours(model, params, ids, mask, GenerationConfig(max_new_tokens=10)))


def test_top_p_filter_keeps_the_nucleus_as_transformers():
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 3
    for p in (0.3, 0.9, 1e-6):
        expected = TopPLogitsWarper(top_p=p)(None, torch.from_numpy(logits)).numpy()
        got = np.asarray(top_p_filter(jnp.asarray(logits), p))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(expected))
        np.testing.assert_array_equal(got[~np.isinf(got)], logits[~np.isinf(expected)])


def test_sampling_is_per_row_reproducible_and_stays_in_the_nucleus(llama):
    _, model, params = llama
    prompts, ids, mask = left_padded((5, 9, 7), seed=9)
    gen = GenerationConfig(max_new_tokens=8, temperature=1.5, top_p=0.5)
    together = ours(model, params, ids, mask, gen, seed=11)
    keys = jax.random.split(jax.random.PRNGKey(11), 3)
    for i, p in enumerate(prompts):   # the same row key alone gives the same draw
        embeds = model.apply(params, jnp.asarray(p[None]), method=Llama.embed)
        alone = decode(params, model.cfg, embeds, jnp.ones((1, len(p)), bool), keys[i:i + 1], gen)
        np.testing.assert_array_equal(np.asarray(alone)[0], together[i])
    # every drawn token lies inside the top-p nucleus of the tempered distribution at its step
    full_ids = np.concatenate([ids, together], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(together)], axis=1).astype(bool)
    embeds = model.apply(params, jnp.asarray(full_ids), method=Llama.embed)
    logits, _ = model.apply(params, embeds, positions_from_mask(jnp.asarray(full_mask)), jnp.asarray(full_mask))
    t = ids.shape[1]
    step_logits = logits[:, t - 1:-1].reshape(-1, logits.shape[-1]) / gen.temperature
    allowed = ~np.isinf(np.asarray(top_p_filter(step_logits, gen.top_p)))
    assert allowed[np.arange(allowed.shape[0]), together.ravel()].all()
    assert allowed.sum(1).max() > 1, "the nucleus held one token everywhere: sampling was not exercised"
    assert not np.array_equal(together, ours(model, params, ids, mask, GenerationConfig(max_new_tokens=8)))
    tiny = ours(model, params, ids, mask, GenerationConfig(max_new_tokens=8, temperature=1.0, top_p=1e-6), seed=2)
    np.testing.assert_array_equal(tiny, ours(model, params, ids, mask, GenerationConfig(max_new_tokens=8)))
