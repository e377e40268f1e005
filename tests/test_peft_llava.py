"""LoRA on a LLaVA (transformers' LlavaForConditionalGeneration + peft, fp32): logits and every adapter gradient,
merge against merge_and_unload, and the llava-hf PEFT directory both ways (peft's in, ours out and back in)."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.convert_helpers import llama_style
from tests.test_llava import IMAGE_TOKEN, prompt_batch
from tests.torch_helpers import random_pixels, rel_err, tiny_llava, to_nchw
from uhd_jax.convert import peft as peft_io
from uhd_jax.convert.cli import main as convert_cli
from uhd_jax.convert.torch_io import iter_tensors
from uhd_jax.models.config import vlm_config
from uhd_jax.models.vlm import VLM
from uhd_jax.train.checkpoints import save_params
from uhd_jax.train.param_tree import flatten, unflatten

peft = pytest.importorskip("peft")

RANK, ALPHA, SEED = 4, 12.0, 7
# the language model's seven linear layers only: a plain list would also adapt CLIP's q/k/v_proj
LANGUAGE_MODEL = (r".*language_model\.layers\.\d+\.(self_attn|mlp)\."
                  r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")


def batch():
    """test_llava's two prompts (the second right-padded) and two random images."""
    return (*prompt_batch(), random_pixels(2, 56, 56, seed=12))


IDS, VALID, IMAGE_MAP, PIXELS = batch()


def torch_logits(model):
    return model(input_ids=torch.from_numpy(IDS), pixel_values=to_nchw(PIXELS),
                 attention_mask=torch.from_numpy(VALID.astype(np.int64))).logits


def our_logits(model_dict, params):
    model = VLM(vlm_config(dict(model_dict, dtype="float32")))
    positions = np.maximum(np.cumsum(VALID, 1) - 1, 0)
    logits, _ = model.apply({"params": params}, jnp.asarray(IDS), jnp.asarray(VALID), jnp.asarray(positions),
                            jnp.asarray(PIXELS[:, None]), jnp.asarray(IMAGE_MAP))
    return logits


def our_logits_jit(model_dict, params):
    return jax.jit(lambda p: our_logits(model_dict, p))(params)


@pytest.fixture(scope="module")
def llava_lora(tmp_path_factory):
    """(peft model, its adapter dir, our base checkpoint, the adapters imported unmerged: params and meta)."""
    root = tmp_path_factory.mktemp("peft_llava")
    src, adapter = root / "llava_hf", root / "adapter"
    tiny_llava(seed=SEED, image_token_index=IMAGE_TOKEN).save_pretrained(src)
    llama_style(str(src), 128, added=("<image>",))   # <image> = 127, as on the hub
    base = str(root / "base")
    assert convert_cli(["import", "--src", str(src), "--out", base]) == 0
    torch.manual_seed(5)   # init_lora_weights=False draws B too, so the adapters change the logits
    cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=LANGUAGE_MODEL,
                          init_lora_weights=False)
    theirs = peft.get_peft_model(tiny_llava(seed=SEED, image_token_index=IMAGE_TOKEN), cfg).eval()
    theirs.save_pretrained(str(adapter))
    params, record, notes = peft_io.import_lora(str(adapter), base)
    assert any("llava-hf PEFT adapter" in n for n in notes)   # no non_lora_trainables.bin needed
    return theirs, str(adapter), base, params, record


def test_llava_logits_with_adapters_match_peft(llava_lora):
    theirs, _, _, params, record = llava_lora
    assert record["model"]["llm"]["lora"] == dict(rank=RANK, alpha=ALPHA, dropout=0.0, targets=peft_io.TARGETS)
    with torch.no_grad():
        ref = torch_logits(theirs).numpy()
        with theirs.disable_adapter():   # the adapters matter: the base alone is far off
            plain = torch_logits(theirs).numpy()
    ours = np.asarray(our_logits_jit(record["model"], params))
    assert rel_err(ours[VALID], ref[VALID]) <= 1e-5
    assert rel_err(plain[VALID], ref[VALID]) > 1e-2


def test_llava_adapter_gradients_match_peft(llava_lora):
    """d(sum of weighted logits over the valid positions)/d(every one of the 28 adapter tensors)."""
    theirs, _, _, params, record = llava_lora
    weights = np.random.default_rng(1).normal(size=IDS.shape + (128,)).astype(np.float32) * VALID[..., None]
    theirs.zero_grad()
    (torch_logits(theirs) * torch.from_numpy(weights)).sum().backward()
    flat = flatten(params)
    adapters = {k: jnp.asarray(v) for k, v in flat.items() if "/lora_" in k}
    rest = {k: jnp.asarray(v) for k, v in flat.items() if k not in adapters}

    def loss(a):
        return jnp.sum(our_logits(record["model"], unflatten({**rest, **a})) * weights)

    grads = jax.jit(jax.grad(loss))(adapters)
    named = {k.replace(".default", ""): p.grad.numpy() for k, p in theirs.named_parameters() if "lora_" in k}
    ours = peft_io.to_peft({k: np.asarray(v) for k, v in grads.items()}, "llava_hf")
    assert len(ours) == 2 * 7 * 2 and sorted(ours) == sorted(named)
    for k, g in ours.items():
        assert np.abs(named[k]).max() > 0, k   # B drawn non-zero: A's gradient too is live
        assert rel_err(g, named[k]) <= 1e-5, k


def test_llava_merge_equals_peft_merge_and_unload(llava_lora):
    theirs, adapter, base, _, _ = llava_lora
    merged, record, _ = peft_io.import_lora(adapter, base, merge=True)
    assert "lora" not in record["model"]["llm"]
    with torch.no_grad():
        ref = torch_logits(copy.deepcopy(theirs).merge_and_unload()).numpy()
    assert rel_err(np.asarray(our_logits_jit(record["model"], merged))[VALID], ref[VALID]) <= 1e-5


def test_llava_hf_peft_directory_out_and_back_in(llava_lora, tmp_path):
    """Our llava-hf PEFT export holds peft's own tensors bit for bit and, in peft, loads onto our export of the base
    (`export --adapters drop`) with the same logits; imported again it gives the checkpoint's adapters bit for bit;
    a merged export loads in transformers alone with the LoRA model's logits."""
    import transformers

    theirs, adapter, base, params, record = llava_lora
    ckpt = str(tmp_path / "ckpt")
    save_params(ckpt, params, record)
    out = str(tmp_path / "peft")
    assert convert_cli(["export-lora", "--checkpoint", ckpt, "--format", "llava_hf", "--out", out]) == 0
    original = {k: a for k, a, _ in iter_tensors(peft_io.adapter_file(adapter))}
    written = {k: a for k, a, _ in iter_tensors(peft_io.adapter_file(out))}
    assert sorted(written) == sorted(original)
    assert all(np.array_equal(written[k], original[k]) for k in original)

    assert convert_cli(["export", "--checkpoint", ckpt, "--format", "llava_hf", "--adapters", "drop",
                        "--out", str(tmp_path / "base")]) == 0
    with torch.no_grad():
        ref = torch_logits(theirs).numpy()
        exported = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "base"))
        reloaded = peft.PeftModel.from_pretrained(exported, out).eval()
        assert rel_err(torch_logits(reloaded).numpy()[VALID], ref[VALID]) <= 1e-5

    again, record_again, _ = peft_io.import_lora(out, base)
    assert record_again["model"] == record["model"]
    a, b = flatten(params), flatten(again)
    assert sorted(a) == sorted(b) and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)

    assert convert_cli(["export", "--checkpoint", ckpt, "--format", "llava_hf", "--out", str(tmp_path / "hf")]) == 0
    merged = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        assert rel_err(torch_logits(merged).numpy()[VALID], ref[VALID]) <= 1e-5
