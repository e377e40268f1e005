"""The LLM's training gradient compiles without transposed copies of its (tokens x features) activations.

With (batch, length) kept as two dims in the dense layers' products, XLA's CPU backend wrote the MLP's and the LM
head's gradients transposed, as strided copies, before the weight-gradient products: 2.1x the time of the rest of the
demo LLM's MLP backward (benchmarks/README.md). `layers.dot_trailing` folds the leading dims first; this test reads
the compiled program of a real `Llama` loss gradient and fails if such a copy comes back."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from uhd_jax.models import layers
from uhd_jax.models.config import llm_config
from uhd_jax.models.llama import Llama, positions_from_mask

B, T = 3, 20   # sizes that no weight shares: an activation copy is told by its element count
LLM = dict(vocab_size=96, hidden_size=32, intermediate_size=72, num_layers=2, num_heads=4, num_kv_heads=2,
           rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64)


def activation_copies(hlo: str, widths) -> list[str]:
    """Instructions of a compiled program that transpose or copy a (B*T x width) array, for any width given."""
    sizes = {B * T * w for w in widths}
    found = []
    for line in hlo.splitlines():
        m = re.search(r"= f32\[([\d,]+)\]\{[\d,]+\} (?:transpose|copy)\(", line)
        if m and int(np.prod([int(d) for d in m.group(1).split(",")])) in sizes:
            found.append(line.strip()[:120])
    return found


def test_llm_gradient_has_no_transposed_activation_copies():
    model = Llama(llm_config({"llm": LLM, "dtype": "float32", "scan_layers": False}))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, LLM["vocab_size"], size=(B, T)), jnp.int32)
    valid = jnp.ones((B, T), bool)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((B, T, LLM["hidden_size"])), positions_from_mask(valid),
                        valid)

    def loss(p):
        logits, _ = model.apply(p, model.apply(p, ids, method=Llama.embed), positions_from_mask(valid), valid)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    assert activation_copies(hlo, (LLM["intermediate_size"], LLM["vocab_size"])) == []


def test_dot_trailing_equals_the_unfolded_product():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 3, 4, 5)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 5, 6, 7)), jnp.float32)
    np.testing.assert_array_equal(layers.dot_trailing(x, w, 2), jnp.einsum("abij,ijkl->abkl", x, w))
    assert layers.dot_trailing(x[0, 0, 0], w[0]).shape == (6, 7)   # no leading dims at all
