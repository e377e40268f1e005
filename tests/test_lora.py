"""LoRA: logits and adapter gradients against transformers + peft (fp32), merge against peft's merge_and_unload, PEFT
directories in and out, the original LLaVA LoRA layout, frozen base in training, the recipe configs."""
import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.torch_helpers import rel_err, tiny_llama
from uhd_jax.convert import peft as peft_io
from uhd_jax.convert.hf_configs import llm_from_hf
from uhd_jax.convert.importer import Source, expected_params, import_checkpoint
from uhd_jax.convert.torch_io import iter_tensors
from uhd_jax.models import lora as lora_lib
from uhd_jax.models.config import llm_config
from uhd_jax.models.llama import Llama, positions_from_mask
from uhd_jax.train.param_tree import flatten, unflatten

peft = pytest.importorskip("peft")

RANK, ALPHA = 4, 12.0
LORA = dict(rank=RANK, alpha=ALPHA, dropout=0.0, targets=lora_lib.TARGETS)
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_lora(base, seed=5):
    """A peft model with non-zero B (init_lora_weights=False draws both A and B)."""
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=MODULES,
                          init_lora_weights=False, task_type="CAUSAL_LM")
    return peft.get_peft_model(base, cfg).eval()


def torch_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits.numpy()


def our_logits(model, params, ids):
    valid = jnp.ones(ids.shape, bool)
    embeds = model.apply(params, jnp.asarray(ids), method=Llama.embed)
    return model.apply(params, embeds, positions_from_mask(valid), valid)[0]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(peft model, its adapter dir, our model with the same base and adapters, our params, model dict)."""
    base_dir = str(tmp_path_factory.mktemp("base"))
    adapter_dir = str(tmp_path_factory.mktemp("adapter"))
    ref = tiny_llama(seed=3)
    ref.save_pretrained(base_dir)
    theirs = peft_lora(ref)
    theirs.save_pretrained(adapter_dir)
    model = {"llm": dict(llm_from_hf(ref.config.to_dict()), lora=LORA), "dtype": "float32"}
    base, _ = import_checkpoint([Source(base_dir)], {**model, "llm": {**model["llm"], "lora": None}})
    expected = {k: v.shape for k, v in expected_params(model, ["llm"]).items() if k.rsplit("/", 1)[1][:5] == "lora_"}
    adapters = peft_io.from_peft(adapter_dir, expected)
    params = unflatten({**flatten(base), **adapters})
    return theirs, adapter_dir, base_dir, Llama(llm_config(model)), {"params": params["llm"]}, model


IDS = np.random.default_rng(0).integers(3, 128, size=(2, 24)).astype(np.int64)


def test_logits_with_adapters_match_peft(pair):
    theirs, _, _, model, params, _ = pair
    ref = torch_logits(theirs, IDS)
    assert rel_err(our_logits(model, params, IDS), ref) <= 1e-5
    with theirs.disable_adapter():   # the adapters matter at this size: the base alone is far off
        assert rel_err(torch_logits(theirs, IDS), ref) > 1e-2


def test_adapter_gradients_match_peft(pair):
    theirs, _, _, model, params, _ = pair
    weights = np.random.default_rng(1).normal(size=(2, 24, 128)).astype(np.float32)
    theirs.zero_grad()
    out = theirs(input_ids=torch.from_numpy(IDS)).logits
    (out * torch.from_numpy(weights)).sum().backward()

    def loss(p):
        return jnp.sum(our_logits(model, {"params": p}, IDS) * weights)

    grads = flatten(jax.jit(jax.grad(loss))(params["params"]))
    named = dict(theirs.named_parameters())
    for layer in range(2):
        for target in ("q", "o", "down"):
            for which in ("a", "b"):
                path = peft_io.our_path(layer, target, which)[len("llm/"):]
                key = peft_io.to_peft({peft_io.our_path(layer, target, which): grads[path]}, "hf_llama")
                (name, ours), = key.items()
                torch_name = name.replace(".weight", ".default.weight")
                assert rel_err(ours, named[torch_name].grad.numpy()) <= 1e-5, name


def test_merge_equals_peft_merge_and_unload(pair):
    theirs, _, _, model, params, spec = pair
    merged_ref = copy.deepcopy(theirs).merge_and_unload()
    merged = {"params": lora_lib.merge_adapters(params["params"], ALPHA / RANK)}
    assert not lora_lib.adapter_paths(merged["params"])
    plain = Llama(llm_config({**spec, "llm": {**spec["llm"], "lora": None}}))
    ours = our_logits(plain, merged, IDS)
    assert rel_err(ours, torch_logits(merged_ref, IDS)) <= 1e-5
    assert rel_err(ours, our_logits(model, params, IDS)) <= 1e-5
    w_ref = merged_ref.model.layers[1].self_attn.o_proj.weight.detach().numpy()
    w = np.asarray(merged["params"]["layers_1"]["attn"]["o"]["kernel"]).reshape(-1, w_ref.shape[0]).T
    assert rel_err(w, w_ref) <= 1e-6


def test_export_is_bit_exact_and_reloads_in_peft(pair, tmp_path):
    theirs, adapter_dir, base_dir, model, params, _ = pair
    flat = {"llm/" + k: np.asarray(v) for k, v in flatten(params["params"]).items()}
    files = peft_io.write_adapter(flat, LORA, "hf_llama", str(tmp_path))
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    original = {k: a for k, a, _ in iter_tensors(peft_io.adapter_file(adapter_dir))}
    written = {k: a for k, a, _ in iter_tensors(peft_io.adapter_file(str(tmp_path)))}
    assert sorted(written) == sorted(original)
    for k in original:
        assert np.array_equal(written[k], original[k]), k
    import transformers
    base = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    reloaded = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    assert rel_err(torch_logits(reloaded, IDS), our_logits(model, params, IDS)) <= 1e-5
    assert peft_io.read_adapter_config(str(tmp_path)) == dict(LORA, alpha=ALPHA)


def test_adapter_of_another_shape_is_named(pair, tmp_path):
    _, adapter_dir, _, _, _, spec = pair
    other = {"llm": {**spec["llm"], "lora": dict(LORA, rank=RANK * 2)}, "dtype": "float32"}
    expected = {k: v.shape for k, v in expected_params(other, ["llm"]).items() if "lora_" in k}
    named = r"28 adapter\(s\) of another shape.*gate_proj\.lora_A\.weight: \(4, 32\), the model's is \(8, 32\)[^|]*$"
    with pytest.raises(ValueError, match=named):
        peft_io.from_peft(adapter_dir, expected)
