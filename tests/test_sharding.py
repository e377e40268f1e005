"""Sharding on the 8-device CPU mesh: parameters land where the logical rules say, and sharded == single device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from uhd_jax.config_loading import load_config
from uhd_jax.models.config import vlm_config
from uhd_jax.models.vlm import VLM, example_inputs, init_fn
from uhd_jax.parallel.mesh import make_mesh
from uhd_jax.parallel.sharding import DEFAULT_RULES, init_sharded, shard_batch


@pytest.fixture(scope="module")
def setup():
    assert jax.device_count() == 8, "conftest must give 8 host devices"
    cfg = vlm_config(load_config("configs/llava15.py:tiny").model)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    variables, shardings = init_sharded(init_fn(cfg), mesh, DEFAULT_RULES, jax.random.PRNGKey(0))
    return cfg, mesh, variables["params"], shardings["params"]


def test_mesh_fills_the_free_axis_and_refuses_bad_shapes():
    assert dict(make_mesh({"data": -1, "tensor": 2}).shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh({"data": 4, "fsdp": 2, "tensor": 2})
    with pytest.raises(ValueError, match="not among"):
        make_mesh({"pipeline": 2})


@pytest.mark.parametrize("path,spec", [
    (("llm", "layers_0", "attn", "q", "kernel"), P("fsdp", "tensor", None)),
    (("llm", "layers_1", "attn", "k", "kernel"), P("fsdp", "tensor", None)),   # 2 KV heads over tensor=2
    (("llm", "layers_0", "attn", "o", "kernel"), P("tensor", None, "fsdp")),
    (("llm", "layers_0", "gate", "kernel"), P("fsdp", "tensor")),
    (("llm", "layers_0", "down", "kernel"), P("tensor", "fsdp")),
    (("llm", "embed_tokens", "embedding"), P("tensor", "fsdp")),
    (("llm", "lm_head"), P("fsdp", "tensor")),
    (("llm", "norm", "scale"), P(None)),
    (("projector", "dense_0", "kernel"), P("fsdp", "tensor")),
    (("projector", "dense_1", "kernel"), P("tensor", "fsdp")),
    (("vision", "patch_embedding"), P(None, None, None, "fsdp")),
    (("vision", "position_embedding"), P(None, "fsdp")),
    (("vision", "layers_0", "fc1", "kernel"), P("fsdp", "tensor")),
])
def test_parameters_carry_rule_shardings(setup, path, spec):
    _, _, params, _ = setup
    leaf = params
    for k in path:
        leaf = leaf[k]
    assert leaf.sharding.spec == spec
    assert leaf.sharding.mesh.axis_names == ("data", "fsdp", "tensor")


def test_indivisible_dimensions_fall_back_to_replication():
    cfg = vlm_config(load_config("configs/llava15.py:tiny").model)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 8})  # 2 KV heads and 4 heads cannot split 8 ways
    params = init_sharded(init_fn(cfg), mesh, DEFAULT_RULES, jax.random.PRNGKey(0))[0]["params"]
    assert params["llm"]["layers_0"]["attn"]["k"]["kernel"].sharding.spec == P("fsdp", None, None)  # fsdp is 1
    assert params["llm"]["layers_0"]["gate"]["kernel"].sharding.spec == P("fsdp", "tensor")  # 64 / 8 splits


def test_sharded_forward_equals_single_device(setup):
    cfg, mesh, params, _ = setup
    model = VLM(cfg)
    rng = np.random.default_rng(0)
    b, length, n_img = 4, 24, cfg.tokens_per_image
    ids = rng.integers(3, 120, size=(b, length)).astype(np.int32)
    valid = np.ones((b, length), bool)
    valid[1, -5:] = False
    positions = np.maximum(np.cumsum(valid, 1) - 1, 0).astype(np.int32)
    pixels = rng.normal(size=(b, 1, 56, 56, 3)).astype(np.float32)
    image_map = np.full((b, length), -1, np.int32)
    image_map[:, 2:2 + n_img] = np.arange(n_img)
    batch = (ids, valid, positions, pixels, image_map)

    single = jax.device_get(params)
    expected, _ = jax.jit(model.apply)({"params": single}, *map(jnp.asarray, batch))

    with jax.set_mesh(mesh):
        sharded_batch = shard_batch(batch, mesh)
        assert sharded_batch[0].sharding.spec == P(("data", "fsdp"), None)
        logits, _ = jax.jit(model.apply)({"params": params}, *sharded_batch)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_abstract_init_allocates_nothing():
    cfg = vlm_config(load_config("configs/llava15.py:7b").model)
    shapes = jax.eval_shape(init_fn(cfg), jax.random.PRNGKey(0))
    leaves = jax.tree_util.tree_leaves(shapes)
    assert all(isinstance(x.value if hasattr(x, "value") else x, jax.ShapeDtypeStruct) for x in leaves)
    assert example_inputs(cfg)[3].shape == (1, 1, 336, 336, 3)
