"""Config-selected model options: remat policies, bf16 compute, experiment configs and their sizes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from uhd_jax.config_loading import load_config
from uhd_jax.models.config import vlm_config
from uhd_jax.models.vlm import VLM, example_inputs, init_fn


def tiny(**model_overrides):
    model = load_config("configs/llava15.py:tiny").model.to_dict()
    model.update(model_overrides)
    return vlm_config(model)


def batch(cfg, b=2, length=24):
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, 120, size=(b, length)), jnp.int32)
    valid = jnp.ones((b, length), bool)
    pos = jnp.broadcast_to(jnp.arange(length), (b, length))
    pixels = jnp.asarray(rng.normal(size=(b, 1, 56, 56, 3)), jnp.float32)
    image_map = jnp.full((b, length), -1, jnp.int32).at[:, 2:2 + cfg.tokens_per_image].set(
        jnp.arange(cfg.tokens_per_image))
    return ids, valid, pos, pixels, image_map


def loss_and_grads(cfg, params):
    model = VLM(cfg)
    inputs = batch(cfg)

    def loss(p):
        logits, _ = model.apply({"params": p}, *inputs)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 7])
    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_saveable", "save_attn_mlp_out"])
def test_remat_policies_give_identical_gradients(policy):
    base = tiny()
    params = init_fn(base)(jax.random.PRNGKey(0))["params"]
    params = nn.meta.unbox(params)
    ref_loss, ref_grads = loss_and_grads(base, params)
    loss, grads = loss_and_grads(tiny(remat_policy=policy), params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # A frozen vision tower receives no gradient.
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree_util.tree_leaves(grads["vision"]))


def test_unknown_remat_policy_is_named():
    with pytest.raises(ValueError, match="unknown remat policy 'everything'"):
        VLM(tiny(remat_policy="everything")).init(jax.random.PRNGKey(0), *example_inputs(tiny()))


def test_bf16_compute_keeps_fp32_params_and_logits():
    cfg32, cfg16 = tiny(), tiny(dtype="bfloat16")
    variables = jax.jit(init_fn(cfg16))(jax.random.PRNGKey(0))
    params = nn.meta.unbox(variables["params"])
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype("float32")}
    logits16, _ = VLM(cfg16).apply({"params": params}, *batch(cfg16))
    logits32, _ = VLM(cfg32).apply({"params": params}, *batch(cfg32))
    assert logits16.dtype == jnp.float32
    hidden16, _ = VLM(cfg16).apply({"params": params}, *batch(cfg16), return_hidden=True)
    assert hidden16.dtype == jnp.bfloat16
    err = float(jnp.max(jnp.abs(logits16 - logits32)) / jnp.max(jnp.abs(logits32)))
    assert 0 < err < 5e-2  # bf16 really ran, and stayed close


def count(shapes) -> int:
    return sum(int(np.prod(x.value.shape if hasattr(x, "value") else x.shape))
               for x in jax.tree_util.tree_leaves(shapes, is_leaf=lambda x: hasattr(x, "value")))


def hf_param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("spec", ["configs/llava15.py:7b", "configs/llava15.py:13b", "configs/llavar.py:13b"])
def test_config_sizes_equal_the_pytorch_models(spec):
    """Each variant has exactly the parameters of the published PyTorch model (HF classes on the meta device)."""
    c = load_config(spec)
    cfg = vlm_config(c.model)
    ours = count(jax.eval_shape(init_fn(cfg), jax.random.PRNGKey(0))["params"])
    m, v = c.model.llm, c.model.vision
    with torch.device("meta"):
        llm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
            num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads))
        clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
            hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
            num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size))
    h = m.hidden_size
    projector = (1024 * h + h + h * h + h) if c.model.projector_type == "mlp2x_gelu" else 1024 * h + h
    assert ours == hf_param_count(llm) + hf_param_count(clip) + projector


def test_config_variants_are_checked():
    with pytest.raises(ValueError, match="unknown variant '70b'"):
        load_config("configs/llava15.py:70b")
    with pytest.raises(FileNotFoundError, match="configs/nope.py"):
        load_config("configs/nope.py")
