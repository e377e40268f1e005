"""Checkpoint files: sharded safetensors and .bin with an index in, sharded safetensors out."""
import json
import os

import numpy as np
import pytest
import torch
import transformers

from tests.torch_helpers import tiny_llama
from uhd_jax.convert.hf_configs import llm_from_hf
from uhd_jax.convert.importer import Source, import_checkpoint
from uhd_jax.convert.torch_io import SafetensorsWriter, checkpoint_files, iter_tensors
from uhd_jax.train.param_tree import flatten


def write_sharded_bin(state, directory, per_shard=5):
    keys = sorted(state)
    weight_map = {}
    for n, start in enumerate(range(0, len(keys), per_shard)):
        name = f"pytorch_model-{n + 1:05d}.bin"
        torch.save({k: state[k] for k in keys[start:start + per_shard]}, directory / name)
        weight_map.update({k: name for k in keys[start:start + per_shard]})
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_sharded_safetensors_and_sharded_bin_import_identically(tmp_path):
    ref = tiny_llama(seed=31)
    st, pt = tmp_path / "st", tmp_path / "bin"
    ref.save_pretrained(st, max_shard_size="20KB")
    assert os.path.exists(st / "model.safetensors.index.json") and len(checkpoint_files(str(st))) > 1
    os.makedirs(pt)
    write_sharded_bin(ref.state_dict(), pt)
    model = {"llm": llm_from_hf(ref.config.to_dict())}
    a = flatten(import_checkpoint([Source(str(st))], model)[0])
    b = flatten(import_checkpoint([Source(str(pt))], model)[0])
    assert sorted(a) == sorted(b) and len(a) == 2 * 9 + 3
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_bf16_tensors_widen_exactly(tmp_path):
    torch.save({"x": torch.tensor([1.5, -2.25, 3e-3], dtype=torch.bfloat16)}, tmp_path / "m.bin")
    (key, array, _), = list(iter_tensors(str(tmp_path / "m.bin")))
    assert key == "x" and array.dtype == np.float32
    np.testing.assert_array_equal(array, torch.tensor([1.5, -2.25, 3e-3], dtype=torch.bfloat16).float().numpy())


def test_index_naming_a_missing_shard_is_reported(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        checkpoint_files(str(tmp_path))


def test_writer_shards_past_the_size_limit_and_transformers_loads_it(tmp_path):
    ref = tiny_llama(seed=32)
    writer = SafetensorsWriter(str(tmp_path), max_bytes=16_000)
    for k, v in ref.state_dict().items():
        writer.add(k, v.numpy())
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not [f for f in os.listdir(tmp_path) if ".tmp." in f]
    ref.config.save_pretrained(tmp_path)
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
