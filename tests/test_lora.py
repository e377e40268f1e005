"""LoRA: logits and adapter gradients against transformers + peft (fp32), merge against peft's merge_and_unload, PEFT
directories in and out, the original LLaVA LoRA layout, frozen base in training, the recipe configs."""
import copy
import json
import os
import re

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


def test_fresh_adapters_follow_peft_init_over_a_bf16_base():
    """A fresh adapter is PEFT's: B zero (the model unchanged), A drawn as peft draws lora_A (kaiming_uniform_ with
    a=sqrt(5): uniform in +-1/sqrt(fan_in)); adapters fp32 over a bf16-stored base. peft's own draws on the same
    shapes give the reference spread."""
    import flax.linen as nn
    import transformers

    from tests.torch_helpers import TINY_LLAMA

    spec = {"llm": dict(llm_from_hf(transformers.LlamaConfig(**TINY_LLAMA).to_dict()), lora=dict(LORA, rank=16),
                        param_dtype="bfloat16"), "dtype": "float32"}
    model = Llama(llm_config(spec))
    ids = jnp.asarray(IDS[:1, :4])
    valid = jnp.ones(ids.shape, bool)
    params = flatten(nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4, 32)),
                                                       positions_from_mask(valid), valid))["params"])
    assert {v.dtype for k, v in params.items() if "/lora_" in k} == {np.dtype(np.float32)}
    assert {v.dtype for k, v in params.items() if k.endswith("/kernel")} == {np.dtype(jnp.bfloat16)}
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=16, lora_alpha=ALPHA, target_modules=MODULES))
    named = dict(theirs.named_parameters())
    for layer in range(2):
        for target, fan_in in (("q", 32), ("o", 32), ("down", 64)):
            path = peft_io.our_path(layer, target, "a")[len("llm/"):]
            a = np.asarray(params[path]).reshape(fan_in, 16)
            torch_a = named[f"base_model.model.model.layers.{layer}.{peft_io.MODULES[target]}.lora_A.default.weight"]
            ref = torch_a.detach().numpy()
            assert np.abs(a).max() <= 1 / np.sqrt(fan_in) and np.abs(ref).max() <= 1 / np.sqrt(fan_in)
            assert abs(a.std() / ref.std() - 1) < 0.2 and np.abs(a).max() > 0.9 / np.sqrt(fan_in), path
            assert not np.asarray(params[path[:-1] + "b"]).any()


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


def test_adapter_of_another_rank_or_base_is_named(pair):
    """The same file against a model of rank 8 (the adapter is rank 4) and against a base twice as wide: each
    mismatch says which it is, the other base's with the first tensor's shapes."""
    _, adapter_dir, _, _, _, spec = pair

    def expected(llm):
        other = {"llm": {**spec["llm"], **llm}, "dtype": "float32"}
        return {k: v.shape for k, v in expected_params(other, ["llm"]).items() if "lora_" in k}

    with pytest.raises(ValueError, match=r"does not fit the model: rank 4 in the file where adapter_config\.json's "
                                         r"r is 8$"):
        peft_io.from_peft(adapter_dir, expected(dict(lora=dict(LORA, rank=RANK * 2))))
    wide = dict(hidden_size=64, intermediate_size=128, lora=LORA)
    with pytest.raises(ValueError, match=r"28 adapter\(s\) for a different base \(other layer sizes\): "
                                         r"base_model\.model\.model\.layers\.0\.mlp\.down_proj\.lora_A\.weight: "
                                         r"\(4, 64\), this base's is \(4, 128\)"):
        peft_io.from_peft(adapter_dir, expected(wide))


@pytest.fixture(scope="module")
def original_lora(tmp_path_factory):
    """A tiny LLaVA-1.5 base (uhd-jax checkpoint) and an original-style LoRA directory on it written by peft itself:
    adapter_model.bin with base_model.model.model.layers.* names (LlavaLlamaForCausalLM's = LlamaForCausalLM's) and
    non_lora_trainables.bin with the projector."""
    import transformers

    from tests.convert_helpers import random_checkpoint
    from uhd_jax.convert.exporter import export_checkpoint

    root = tmp_path_factory.mktemp("original")
    base = random_checkpoint(root / "base", "configs/llava15.py:tiny", seed=2)
    export_checkpoint(base, "hf_llama", str(root / "llm"))
    theirs = peft_lora(transformers.LlamaForCausalLM.from_pretrained(str(root / "llm")), seed=7)
    src = root / "lora"
    theirs.save_pretrained(str(src), safe_serialization=False)
    rng = np.random.default_rng(3)
    projector = {"base_model.model.model.mm_projector.0.weight": rng.normal(size=(32, 32)),
                 "base_model.model.model.mm_projector.0.bias": rng.normal(size=(32,)),
                 "base_model.model.model.mm_projector.2.weight": rng.normal(size=(32, 32)),
                 "base_model.model.model.mm_projector.2.bias": rng.normal(size=(32,))}
    projector = {k: torch.from_numpy(v.astype(np.float32)) for k, v in projector.items()}
    torch.save(projector, str(src / "non_lora_trainables.bin"))
    return base, str(src), theirs, projector


def llm_of(params, model):
    return Llama(llm_config(model)), {"params": params["llm"]}


def test_original_lora_dir_imports_unmerged_and_merged(original_lora, tmp_path, capsys):
    from uhd_jax.convert.cli import main
    from uhd_jax.train.checkpoints import load_meta, load_params

    base, src, theirs, projector = original_lora
    assert os.path.basename(peft_io.adapter_file(src)) == "adapter_model.bin"
    assert main(["import-lora", "--src", src, "--base", base, "--out", str(tmp_path / "unmerged")]) == 0
    assert "4 projector tensors from non_lora_trainables.bin" in capsys.readouterr().out
    meta = load_meta(str(tmp_path / "unmerged"))
    assert meta["model"]["llm"]["lora"] == dict(LORA, targets=list(lora_lib.TARGETS))
    params = load_params(str(tmp_path / "unmerged"))
    ref = torch_logits(theirs, IDS)
    assert rel_err(our_logits(*llm_of(params, meta["model"]), IDS), ref) <= 1e-5
    w = projector["base_model.model.model.mm_projector.2.weight"].numpy()
    assert np.array_equal(np.asarray(params["projector"]["dense_1"]["kernel"]), w.T)

    merged, record, _ = peft_io.import_lora(src, base, merge=True)
    assert "lora" not in record["model"]["llm"] and not lora_lib.adapter_paths(merged)
    merged_ref = copy.deepcopy(theirs).merge_and_unload()
    assert rel_err(our_logits(*llm_of(merged, record["model"]), IDS), torch_logits(merged_ref, IDS)) <= 1e-5
    w_ref = merged_ref.model.layers[0].mlp.down_proj.weight.detach().numpy()
    assert rel_err(np.asarray(merged["llm"]["layers_0"]["down"]["kernel"]).T, w_ref) <= 1e-6


@pytest.mark.parametrize("fmt", ["llava_original", "hf_llama"])
def test_export_lora_round_trip_is_bit_exact(original_lora, tmp_path, fmt):
    """import-lora -> export-lora -> import-lora gives every tensor back bit for bit (hf_llama's directory has no
    projector: the one checked there is the base's)."""
    from uhd_jax.train.checkpoints import load_params, save_params

    base, src, _, _ = original_lora
    params, record, _ = peft_io.import_lora(src, base)
    save_params(str(tmp_path / "ckpt"), params, record)
    files = peft_io.export_lora(str(tmp_path / "ckpt"), fmt, str(tmp_path / "out"))
    assert files == ["adapter_config.json", "adapter_model.safetensors"] + (
        ["non_lora_trainables.bin"] if fmt == "llava_original" else [])
    again, record_again, _ = peft_io.import_lora(str(tmp_path / "out"), base, base_projector=fmt == "hf_llama")
    assert record_again["model"] == record["model"]
    a, b = flatten(params), flatten(again)
    if fmt == "hf_llama":
        a.update({k: v for k, v in flatten(load_params(base)).items() if k.startswith("projector/")})
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k


def test_missing_non_lora_trainables_says_what_loads(original_lora, tmp_path, capsys):
    import shutil

    from uhd_jax.convert.cli import main

    base, src, _, _ = original_lora
    partial = tmp_path / "partial"
    shutil.copytree(src, partial, ignore=shutil.ignore_patterns("non_lora_trainables.bin"))
    assert main(["import-lora", "--src", str(partial), "--base", base, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --base-projector" in err
    with pytest.raises(ValueError, match=r"no non_lora_trainables\.bin.*the 28 adapter tensors would load, but onto"):
        peft_io.import_lora(str(partial), base)
    _, _, notes = peft_io.import_lora(str(partial), base, base_projector=True)
    assert any("the projector is" in n for n in notes)


def test_targets_of_the_config_must_match_the_tensors(original_lora, tmp_path):
    import shutil

    base, src, _, _ = original_lora
    fewer = tmp_path / "fewer"
    shutil.copytree(src, fewer)
    cfg = json.loads((fewer / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "v_proj"]
    (fewer / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"adapter_config\.json targets \['q_proj', 'v_proj'\] but the tensors adapt "
                                         r"\['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', "
                                         r"'down_proj'\]$"):
        peft_io.import_lora(str(fewer), base)
    cfg["target_modules"] = ["q_proj", "lm_head"]
    (fewer / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"target_modules \['lm_head'\] are not LLM linear layers"):
        peft_io.import_lora(str(fewer), base)


@pytest.mark.parametrize("case, said", [
    ("targets", r"adapter_config\.json targets \['q_proj', 'v_proj'\] but the tensors adapt \['q_proj', 'k_proj'"),
    ("rank", r"rank 4 in the file where adapter_config\.json's r is 8"),
    ("base", r"6 adapter\(s\) for a different base \(other layer sizes\): [^ ]*mlp\.gate_proj\.lora_B\.weight: "
             r"\(64, 4\), this base's is \(48, 4\)"),
    ("projector", r"no non_lora_trainables\.bin.*the 28 adapter tensors would load, but onto"),
])
def test_bad_lora_directories_are_one_line_and_exit_2(original_lora, tmp_path, capsys, case, said):
    """uhd-convert import-lora on a directory whose adapter_config.json names other targets or another rank than its
    tensors, on a base of other layer sizes, or without the projector file: exit 2, one line saying which."""
    import shutil

    from tests.convert_helpers import random_checkpoint
    from uhd_jax.convert.cli import main

    base, src, _, _ = original_lora
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    if case == "targets":
        cfg["target_modules"] = ["q_proj", "v_proj"]
    elif case == "rank":
        cfg["r"] = 8
    elif case == "base":
        base = random_checkpoint(tmp_path / "other", "configs/llava15.py:tiny", dict(intermediate_size=48))
    else:
        os.remove(bad / "non_lora_trainables.bin")
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["import-lora", "--src", str(bad), "--base", base, "--out", str(tmp_path / "out")]) == 2
    out = capsys.readouterr()
    assert out.err.count("\n") == 1 and out.err.startswith("uhd-convert: error: ") and not out.out, out.err
    assert re.search(said, out.err), out.err
    assert not os.path.exists(tmp_path / "out" / "config.json")


def test_export_lora_of_a_checkpoint_without_adapters_is_one_line(original_lora, tmp_path, capsys):
    from uhd_jax.convert.cli import main

    base, _, _, _ = original_lora
    assert main(["export-lora", "--checkpoint", base, "--format", "llava_hf", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no LoRA adapters (its model.llm.lora is unset)" in err


def test_init_checkpoint_adapters_must_be_the_stages(pair):
    """A LoRA checkpoint a stage starts from: its adapters' rank and targets must be the stage's lora (one line saying
    which differs, a UserError: exit 2 from uhd-train); a base without adapters always fits."""
    from uhd_jax.cli_errors import UserError

    _, _, _, _, _, spec = pair

    def flat(lora):
        return dict(expected_params({"llm": {**spec["llm"], "lora": lora}, "dtype": "float32"}, ["llm"]))

    stage = flat(LORA)
    lora_lib.check_init_adapters(flat(None), stage, "base/")
    lora_lib.check_init_adapters(flat(dict(LORA, alpha=1.0)), stage, "same/")
    with pytest.raises(UserError, match=r"^init checkpoint r8/ holds rank-8 LoRA adapters on \['q', 'k', 'v', 'o', "
                                        r"'gate', 'up', 'down'\]; the stage's lora\.rank is 4: set it to 8"):
        lora_lib.check_init_adapters(flat(dict(LORA, rank=8)), stage, "r8/")
    with pytest.raises(UserError, match=r"^init checkpoint qv/ holds rank-4 LoRA adapters on \['q', 'v'\]; the stage's "
                                        r"lora\.targets are \['q', 'k', 'v', 'o', 'gate', 'up', 'down'\]"):
        lora_lib.check_init_adapters(flat(dict(LORA, targets=("q", "v"))), stage, "qv/")
    with pytest.raises(UserError, match=r"holds rank-4 LoRA adapters .* but the stage has no lora: give it "
                                        r"lora=dict\(rank=4,"):
        lora_lib.check_init_adapters(stage, flat(None), "lora/")


def test_llava_hf_adapter_names_are_the_ones_peft_loads(pair, tmp_path):
    """llava-hf nests the decoder at model.language_model: peft puts our exported tensors into its modules (a name
    it did not know would leave its own init there: B zero)."""
    from tests.torch_helpers import tiny_llava

    _, _, _, _, params, _ = pair
    flat = {"llm/" + k: np.asarray(v) for k, v in flatten(params["params"]).items()}
    peft_io.write_adapter(flat, LORA, "llava_hf", str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(tiny_llava(), str(tmp_path))
    names = {k.replace(".default", ""): v for k, v in loaded.named_parameters() if "lora_" in k}
    ours = peft_io.to_peft(flat, "llava_hf")
    assert sorted(names) == sorted(ours)
    for k, v in ours.items():
        assert np.array_equal(names[k].detach().numpy(), v), k


def test_lora_stage_trains_only_adapters_and_named_groups():
    """The 7b_lora rules on the tiny VLM claim exactly the adapters and the projector; in training (on the LLM
    alone, its lm_head standing in for a fully trained group) the frozen base has neither gradient nor optimizer
    state and stays bit-identical, while the adapters and the named group move."""
    import flax.linen as nn
    import optax

    from uhd_jax.configs import common, llava15
    from uhd_jax.models.config import vlm_config
    from uhd_jax.models.vlm import VLM, example_inputs
    from uhd_jax.train import optimizer as opt
    from uhd_jax.train.trainer import stage_model

    c = llava15.get_config("tiny")
    common.lora_stage(c.stages.sft, dict(rank=4, alpha=8.0, dropout=0.1), lr=1e-2)
    cfg = vlm_config(stage_model(c, c.stages.sft))
    assert cfg.llm.lora.rank == 4 and cfg.stochastic_training
    abstract = nn.meta.unbox(jax.eval_shape(VLM(cfg).init, jax.random.PRNGKey(0), *example_inputs(cfg))["params"])
    opt.check_rules(abstract, c.stages.sft.trainable, c.stages.sft.lrs)
    labels = flatten(opt.group_labels(abstract, c.stages.sft.trainable))
    assert {k for k, g in labels.items() if g != opt.FROZEN} == {
        k for k in labels if "/lora_" in k or k.startswith("projector/")}

    model = Llama(cfg.llm)
    ids = jnp.asarray(IDS[:1, :12])
    valid = jnp.ones(ids.shape, bool)
    embeds = jnp.zeros((1, 12, cfg.llm.hidden_size))
    params = {"llm": nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), embeds, positions_from_mask(valid),
                                                       valid))["params"]}
    rules = [("llm/.*lora_.*", "lora"), ("llm/lm_head", "head"), ("llm/.*", "frozen")]
    labels = opt.group_labels(params, rules)
    trainable, frozen = opt.split_trainable(params, labels)
    tx, _ = opt.make_optimizer(opt.trainable_labels(labels), {"lora": 1e-2, "head": 1e-2}, total_steps=10,
                               warmup_ratio=0.0)
    state = tx.init(trainable)
    trained = {k for k, v in flatten(trainable).items() if v is not None}
    assert trained == {k for k in flatten(params) if "/lora_" in k} | {"llm/lm_head"}
    n_state = sum(x.size for x in jax.tree_util.tree_leaves(state) if x.ndim > 0)
    assert n_state == 2 * sum(flatten(params)[k].size for k in trained)   # Adam's m and v, nothing for the base

    @jax.jit
    def step(t, st, key):
        def loss(t):
            p = opt.merge(t, frozen)["llm"]
            embeds = model.apply({"params": p}, ids, method=Llama.embed)
            out, _ = model.apply({"params": p}, embeds, positions_from_mask(valid), valid, rngs={"dropout": key})
            return jnp.mean(out ** 2)
        updates, st = tx.update(jax.grad(loss)(t), st, t)
        return optax.apply_updates(t, updates), st

    t = trainable
    for i in range(2):   # A's gradient is zero while B is (PEFT's init): the second step moves it
        t, state = step(t, state, jax.random.PRNGKey(i))
    after, before = flatten(opt.merge(t, frozen)), flatten(params)
    moved = {k for k in before if not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))}
    assert moved == trained


@pytest.mark.parametrize("spec, lora_lr, others", [
    ("configs/llava15.py:7b_lora", 2e-4, {"projector": 2e-5}),
    ("configs/slime.py:8b_lora", 1e-4, {"projector": 2e-5}),
    ("configs/slime.py:70b_lora", 1e-4, {"projector": 2e-5}),
    ("configs/uhd_v1.py:13b_lora", 2e-4, {"projector": 2e-5}),
    ("configs/uhd_v2.py:7b_lora", 2e-4, {"projector": 2e-5, "vision": 2e-5}),
])
def test_lora_recipes_carry_the_spec_numbers(spec, lora_lr, others):
    """The recipes' numbers, and their rules checked on the model (at tiny sizes: the rules name paths, not sizes)."""
    import flax.linen as nn

    from uhd_jax.config_loading import load_config
    from uhd_jax.configs import common
    from uhd_jax.models.config import vlm_config
    from uhd_jax.models.vlm import init_fn
    from uhd_jax.train import optimizer as opt
    from uhd_jax.train.trainer import stage_model

    c = load_config(spec)
    sft = c.stages.sft
    assert dict(sft.lora) == dict(rank=128, alpha=256.0, dropout=0.05, targets=lora_lib.TARGETS)
    assert dict(sft.lrs) == dict(others, lora=lora_lr)
    assert (sft.batch_size, sft.num_epochs, sft.warmup_ratio) == (128, 1.0, 0.03)
    assert sft.grad_accum == common.LORA_GRAD_ACCUM   # one sequence per micro-batch: the step that fits (README)
    assert ("llm/.*lora_.*", "lora") in [tuple(r) for r in sft.trainable]
    assert tuple(sft.trainable[-1]) == ("llm/.*", "frozen")
    if "70b" in spec:
        assert (c.model.llm.hidden_size, c.model.llm.num_layers, c.model.llm.num_kv_heads) == (8192, 80, 8)
    small = common.tiny_recipe(load_config(spec), "lora_tiny", max_length=160)
    assert small.stages.sft.grad_accum == 1
    if small.model.get("slime"):   # as slime.py:7b_tiny; the separator is looked up in a tokenizer otherwise
        grid = small.model.vision.image_size // small.model.vision.patch_size
        small.model.slime.update(separator_id=0, global_grid=grid, local_grid=grid // 2)
    boxed = jax.eval_shape(init_fn(vlm_config(stage_model(small, small.stages.sft))), jax.random.PRNGKey(0))
    opt.check_rules(nn.meta.unbox(boxed["params"]), [tuple(r) for r in sft.trainable], dict(sft.lrs))


def test_scanned_layers_with_adapters_match_and_merge(pair):
    """The recipes scan their layers (and remat): adapters stack along the layer axis with their axis names, the
    dropout rng splits per layer, and the merge handles the stacked tree."""
    import dataclasses

    from uhd_jax.train.param_tree import match_layer_layout

    theirs, _, _, model, params, _ = pair
    cfg = dataclasses.replace(model.cfg, scan_layers=True, remat_policy="save_attn_mlp_out")
    scanned = Llama(cfg)
    stacked = unflatten(match_layer_layout(flatten({"llm": params["params"]}), scanned=False, want_scanned=True))
    p = {"params": stacked["llm"]}
    ref = torch_logits(theirs, IDS)
    assert rel_err(our_logits(scanned, p, IDS), ref) <= 1e-5
    merged = {"params": lora_lib.merge_adapters(p["params"], ALPHA / RANK)}
    assert rel_err(our_logits(Llama(dataclasses.replace(cfg, lora=None)), merged, IDS), ref) <= 1e-5
    boxed = jax.eval_shape(scanned.init, jax.random.PRNGKey(0), jnp.zeros((1, 4, 32)), jnp.zeros((1, 4), jnp.int32),
                           jnp.ones((1, 4), bool))["params"]["layers"]["attn"]["o"]
    assert boxed["lora_a"].names == ("layers", "heads", "head_dim", None)
    assert boxed["lora_b"].names == ("layers", None, "embed")


def test_train_step_memory_compiles_the_lora_step_abstractly():
    """uhd_jax.perf.train_memory (the README's LoRA memory figures): the real step of a LoRA stage, compiled with
    abstract state; the trained parameters are the adapters and the projector, and the frozen base is counted apart."""
    from uhd_jax.config_loading import load_config
    from uhd_jax.configs import common
    from uhd_jax.perf.train_memory import step_memory

    c = load_config("configs/llava15.py:tiny")
    common.lora_stage(c.stages.sft, dict(rank=4, alpha=8.0, dropout=0.05), lr=1e-4)
    out = step_memory(c, "sft", per_device=2, length=32, mesh_shape=dict(data=1, fsdp=1, tensor=1))
    llm = dict(c.model.llm)
    h, m, layers, heads, kv = (llm[k] for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads",
                                                "num_kv_heads"))
    d = h // heads
    per_layer = 4 * sum(i + o for i, o in ((h, heads * d), (h, kv * d), (h, kv * d), (heads * d, h), (h, m), (h, m),
                                           (m, h)))
    projector = 32 * 32 * 2 + 32 * 2   # tiny mlp2x_gelu: vision 32 -> 32 -> 32
    assert out["trained_parameters"] == layers * per_layer + projector
    assert out["peak_bytes"] >= out["argument_bytes"] > 0 and out["temp_bytes"] > 0


def test_evaluation_with_unmerged_adapters_answers_as_merged(synthetic_data, tmp_path):
    """Generation through the evaluation path (load_model -> setup -> answer_questions, as uhd-eval and uhd-generate
    run it) on a LoRA checkpoint with its adapters unmerged (applied on the fly, the checkpoint's model carries
    llm.lora) and on the same checkpoint merged: the same greedy answers, word for word."""
    import flax.linen as nn

    from tests.config_helpers import on_synthetic_data
    from uhd_jax.eval import answers as answer_files
    from uhd_jax.eval.model_vqa import answer_questions, load_model, rule_for, setup
    from uhd_jax.models.config import vlm_config
    from uhd_jax.models.vlm import init_fn
    from uhd_jax.train.checkpoints import save_params
    from uhd_jax.train.trainer import stage_model

    config = on_synthetic_data("configs/llava15.py:tiny", synthetic_data)
    lora = dict(rank=4, alpha=8.0, dropout=0.05, targets=list(lora_lib.TARGETS))
    model = dict(stage_model(config, config.stages.sft), llm=dict(config.model.llm.to_dict(), lora=lora))
    shapes = flatten(nn.meta.unbox(jax.eval_shape(init_fn(vlm_config(model)), jax.random.PRNGKey(4))["params"]))
    rng = np.random.default_rng(6)   # random weights, norms near 1; B not zero, as after training
    flat = {k: (rng.normal(0, 0.2, v.shape) + k.endswith("/scale")).astype(np.float32) for k, v in shapes.items()}
    save_params(str(tmp_path / "unmerged"), unflatten(flat), {"model": model})
    merged = lora_lib.merge_adapters(unflatten(flat), lora_lib.lora_config(lora).scaling)
    plain = dict(model, llm={k: v for k, v in model["llm"].items() if k != "lora"})
    save_params(str(tmp_path / "merged"), merged, {"model": plain})

    images = sorted(os.listdir(os.path.join(synthetic_data["images"], "eval")))[:4]
    questions = [{"question_id": f"q{i}", "image": img, "text": f"What is written on sign {i}?"}
                 for i, img in enumerate(images)]
    answers = {}
    for name in ("unmerged", "merged"):
        loaded = load_model(config, str(tmp_path / name))
        assert (loaded.cfg.llm.lora is None) == (name == "merged")
        answering = setup(loaded, rule_for(config, "textvqa"), os.path.join(synthetic_data["images"], "eval"),
                          batch_size=4, max_new_tokens=6)
        out = str(tmp_path / f"{name}.jsonl")
        assert answer_questions(answering, questions, out, log=lambda *_: None)["answered_now"] == 4
        answers[name] = {a["question_id"]: a["text"] for a in answer_files.read_answers(out)}
    assert answers["unmerged"] == answers["merged"]
    assert len(set(answers["merged"].values())) > 1   # not one degenerate answer for every question


def test_export_merges_or_leaves_out_the_adapters_for_peft(original_lora, tmp_path):
    """`uhd-convert export` of a LoRA checkpoint: merged by default (transformers alone gives the LoRA model's
    logits), or the base alone (`--adapters drop`) onto which `export-lora`'s PEFT directory loads in peft."""
    import transformers

    from uhd_jax.convert.cli import main
    from uhd_jax.train.checkpoints import save_params

    base, src, theirs, _ = original_lora
    params, record, _ = peft_io.import_lora(src, base)
    ckpt = str(tmp_path / "ckpt")
    save_params(ckpt, params, record)
    ref = torch_logits(theirs, IDS)
    assert main(["export", "--checkpoint", ckpt, "--format", "hf_llama", "--out", str(tmp_path / "merged")]) == 0
    merged = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert rel_err(torch_logits(merged, IDS), ref) <= 1e-5
    assert main(["export", "--checkpoint", ckpt, "--format", "hf_llama", "--adapters", "drop",
                 "--out", str(tmp_path / "base")]) == 0
    assert main(["export-lora", "--checkpoint", ckpt, "--format", "hf_llama", "--out", str(tmp_path / "peft")]) == 0
    plain = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "base"))
    assert rel_err(torch_logits(plain.eval(), IDS), ref) > 1e-2
    reloaded = peft.PeftModel.from_pretrained(plain, str(tmp_path / "peft")).eval()
    assert rel_err(torch_logits(reloaded, IDS), ref) <= 1e-5


def test_lora_stage_resumes_exactly_and_compiles_once(synthetic_data, tmp_path):
    """A LoRA stage through the trainer (adapter dropout live): killed two steps after its step-4 checkpoint and
    rerun, steps 5-8 give the uninterrupted run's losses exactly; one compilation; the frozen base of final/ is its
    random initialisation bit for bit while every adapter moved."""
    import flax.linen as nn

    from tests.config_helpers import on_synthetic_data
    from uhd_jax.configs import common
    from uhd_jax.models.vlm import init_fn
    from uhd_jax.train.checkpoints import load_params
    from uhd_jax.train.metrics_log import read_metrics
    from uhd_jax.train.trainer import model_for_stage, run_stage

    c = on_synthetic_data("configs/llava15.py:tiny", synthetic_data, batch_size=8, max_length=112, save_every=4,
                          num_steps=8, log_every=1, init_from_stage="")
    common.lora_stage(c.stages.sft, dict(rank=4, alpha=8.0, dropout=0.1), lr=1e-2, base_dtype=None)

    def losses(workdir):
        return {r["step"]: r["loss"] for r in read_metrics(os.path.join(workdir, "sft", "metrics.jsonl"))
                if "loss" in r}

    straight = run_stage(c, "sft", str(tmp_path / "straight"))
    assert straight.step_compilations == 1
    run_stage(c, "sft", str(tmp_path / "resumed"), stop_after=6)
    run_stage(c, "sft", str(tmp_path / "resumed"))
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(a[s] == b[s] for s in range(5, 9)), (a, b)

    cfg = model_for_stage(c, c.stages.sft)
    seed = c.seed + list(c.stage_order).index("sft")
    init = flatten(nn.meta.unbox(jax.jit(init_fn(cfg))(jax.random.PRNGKey(seed))["params"]))
    final = flatten(load_params(straight.final_dir))
    adapters = [k for k in final if "/lora_" in k]
    assert len(adapters) == 2 * 7 * cfg.llm.num_layers
    for k, v in final.items():
        moved = not np.array_equal(np.asarray(v), np.asarray(init[k]))
        assert moved == (k in adapters or k.startswith("projector/")), k


def test_stage_from_a_lora_checkpoint_of_another_rank_stops_in_one_line(synthetic_data, tmp_path):
    """The trainer's init overlay checks a LoRA checkpoint's adapters against the stage's before loading anything:
    rank-8 adapters into a rank-4 stage are one UserError line (uhd-train's exit 2), not a shape error."""
    from tests.config_helpers import on_synthetic_data
    from uhd_jax.cli_errors import UserError
    from uhd_jax.configs import common
    from uhd_jax.train.checkpoints import save_params
    from uhd_jax.train.trainer import run_stage

    init = str(tmp_path / "rank8")
    save_params(init, {"llm": {"layers_0": {"attn": {"q": {"lora_a": np.zeros((32, 8), np.float32)}}}}},
                {"model": {"scan_layers": False}})
    c = on_synthetic_data("configs/llava15.py:tiny", synthetic_data, batch_size=8, max_length=112, num_steps=1,
                          init_from_stage="", init_checkpoints=[init])
    common.lora_stage(c.stages.sft, dict(rank=4, alpha=8.0, dropout=0.0), lr=1e-2, base_dtype=None)
    with pytest.raises(UserError, match=rf"^init checkpoint {init} holds rank-8 LoRA adapters on \['q'\]; the "
                                        r"stage's lora.rank is 4: set it to 8, or start from a checkpoint without"):
        run_stage(c, "sft", str(tmp_path / "run"))
