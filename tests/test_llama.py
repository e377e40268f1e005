"""Llama: logits against transformers (MHA, GQA, Llama-3 RoPE scaling, scanned layers), the KV cache."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.torch_helpers import rel_err, tiny_llama
from uhd_jax.convert.hf_configs import llm_from_hf
from uhd_jax.convert.importer import Source, import_checkpoint
from uhd_jax.models.config import llm_config
from uhd_jax.models.llama import Llama, init_cache, positions_from_mask

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
VARIANTS = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "llama3_rope": dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE),
}


def convert(ref, tmp_path, scan=False):
    ref.save_pretrained(tmp_path)
    model = {"llm": llm_from_hf(ref.config.to_dict()), "dtype": "float32", "scan_layers": scan}
    params, report = import_checkpoint([Source(str(tmp_path))], model)
    return Llama(llm_config(model)), {"params": params["llm"]}, report


def torch_logits(ref, ids, mask=None):
    with torch.no_grad():
        return ref(input_ids=torch.from_numpy(ids), attention_mask=None if mask is None else torch.from_numpy(mask)
                   ).logits.numpy()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("scan", [False, True])
def test_logits_match_transformers(variant, scan, tmp_path):
    ref = tiny_llama(seed=3, **VARIANTS[variant])
    model, params, report = convert(ref, tmp_path, scan=scan)
    assert report["layouts"] == ["hf_llama"]
    ids = np.random.default_rng(0).integers(3, 128, size=(2, 80)).astype(np.int64)  # past 64: llama3 scaling bites
    valid = jnp.ones(ids.shape, bool)
    logits, _ = model.apply(params, model.apply(params, jnp.asarray(ids), method=Llama.embed),
                            positions_from_mask(valid), valid)
    assert logits.dtype == jnp.float32
    assert rel_err(logits, torch_logits(ref, ids)) <= 1e-5


def test_qwen2_logits_match_transformers(tmp_path):
    """Qwen2 (LLaVA-UHD v2-head's LLM): GQA with q/k/v biases, RoPE theta 1e6, untied head."""
    import transformers

    from tests.torch_helpers import TINY_LLAMA, randomize

    torch.manual_seed(4)
    cfg = transformers.Qwen2Config(**{**TINY_LLAMA, "num_key_value_heads": 2, "rope_theta": 1e6,
                                      "tie_word_embeddings": False, "rms_norm_eps": 1e-6})
    ref = randomize(transformers.Qwen2ForCausalLM(cfg), 4)
    assert ref.model.layers[0].self_attn.q_proj.bias is not None
    model, params, _ = convert(ref, tmp_path)
    assert model.cfg.attention_bias and model.cfg.rope_theta == 1e6
    ids = np.random.default_rng(1).integers(3, 128, size=(2, 40)).astype(np.int64)
    valid = jnp.ones(ids.shape, bool)
    logits, _ = model.apply(params, model.apply(params, jnp.asarray(ids), method=Llama.embed),
                            positions_from_mask(valid), valid)
    assert rel_err(logits, torch_logits(ref, ids)) <= 1e-5


def test_left_and_right_padding_match_unpadded(tmp_path):
    ref = tiny_llama(seed=4)
    model, params, _ = convert(ref, tmp_path)
    ids = np.random.default_rng(1).integers(3, 128, size=(1, 9))
    alone = torch_logits(ref, ids)[0]
    pad = np.zeros((1, 4), np.int64)
    for left in (True, False):
        padded = np.concatenate([pad, ids] if left else [ids, pad], 1)
        valid = np.concatenate([pad == 1, ids > 0] if left else [ids > 0, pad == 1], 1)
        logits, _ = model.apply(params, model.apply(params, jnp.asarray(padded), method=Llama.embed),
                                positions_from_mask(jnp.asarray(valid)), jnp.asarray(valid))
        real = np.asarray(logits)[0][valid[0]]
        assert rel_err(real, alone) <= 1e-5


def test_kv_cache_prefill_then_decode_equals_full_forward(tmp_path):
    ref = tiny_llama(seed=5)
    model, params, _ = convert(ref, tmp_path)
    cfg = model.cfg
    ids = jnp.asarray(np.random.default_rng(2).integers(3, 128, size=(2, 12)))
    embed = lambda x: model.apply(params, x, method=Llama.embed)  # noqa: E731
    full, _ = model.apply(params, embed(ids), positions_from_mask(jnp.ones((2, 12), bool)), jnp.ones((2, 12), bool))
    cache = init_cache(cfg, 2, 16)
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    pre, cache = model.apply(params, embed(ids[:, :8]), pos[:, :8], jnp.ones((2, 8), bool), cache=cache)
    steps = [pre]
    for t in range(8, 12):
        step, cache = model.apply(params, embed(ids[:, t:t + 1]), pos[:, t:t + 1], jnp.ones((2, 1), bool), cache=cache)
        steps.append(step)
    assert cache.lengths.tolist() == [12, 12]
    assert rel_err(jnp.concatenate(steps, 1), full) <= 1e-5
