"""`uhd-convert`: without --config the model and family come from the config.json keys the originals
write (uhd.md §0, §4.1; llava15_slime_llavar.md A, C, D), and every common mistake is one line with exit status 2."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

from tests.convert_helpers import llama_style, random_checkpoint
from tests.torch_helpers import tiny_llava
from uhd_jax.convert.cli import main as convert_cli
from uhd_jax.convert.cli import model_for_sources
from uhd_jax.convert.importer import Source
from uhd_jax.config_loading import load_config
from uhd_jax.models.config import vlm_config
from uhd_jax.train.checkpoints import load_meta, load_params, save_params
from uhd_jax.train.param_tree import flatten

CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, patch_size=14, image_size=336)
# LLM keys at the top level, as LlavaLlamaForCausalLM / LlavaQwenForCausalLM save them (tiny sizes).
LLAMA = dict(architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama", hidden_size=64, intermediate_size=128,
             num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2, rms_norm_eps=1e-5, rope_theta=10000.0,
             vocab_size=128, max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
QWEN2 = dict(architectures=["LlavaQwenForCausalLM"], model_type="llava_qwen", hidden_size=64, intermediate_size=128,
             num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, rms_norm_eps=1e-6, rope_theta=1e6,
             vocab_size=160, max_position_embeddings=1024, tie_word_embeddings=False, use_sliding_window=False,
             sliding_window=4096, max_window_layers=2)
# initialize_vision_modules + train.py of LLaVA-1.5 and its forks
MM = dict(mm_vision_tower="openai/clip-vit-large-patch14-336", mm_hidden_size=1024, mm_vision_select_layer=-2,
          mm_vision_select_feature="patch", mm_patch_merge_type="flat", mm_use_im_start_end=False,
          mm_use_im_patch_token=False, use_mm_proj=True, image_aspect_ratio="pad", tokenizer_padding_side="right",
          tokenizer_model_max_length=2048, tune_mm_mlp_adapter=False)

# name: (config.json, expected family / projector fields, experiment config of that family)
ORIGINALS = {
    "uhd_v1_eccv": (dict(LLAMA, **MM, mm_projector_type="adapt_spatial_resampler"),
                    dict(family="uhd_v1", projector_type="adapt_spatial_resampler"), "configs/uhd_v1.py:tiny"),
    "uhd_v1_in_v2_head_qwen2": (dict(QWEN2, **MM, mm_projector_type="adapt_spatial_resampler_v1", model_mode="uhd_v1",
                                     feature_scale_mask=7, jbu_vdim="ckpt/clip-large-vdim.ckpt"),
                                dict(family="uhd_v1", projector_type="adapt_spatial_resampler"),
                                "configs/uhd_v1.py:tiny"),
    "uhd_v1_query64": (dict(LLAMA, **MM, mm_projector_type="uhd_v1_query64", model_mode="uhd_v1"),
                       dict(family="uhd_v1", projector_type="uhd_v1_query64"), "configs/uhd_v1.py:demo"),
    "uhd_v2_head": (dict(QWEN2, **MM, mm_projector_type="adapt_spatial_resampler_v2", model_mode="uhd_v2",
                         feature_scale_mask=5, jbu_vdim="ckpt/clip-large-vdim.ckpt", mm_vision_tower_lr=2e-6),
                    dict(family="uhd_v2", projector_type="adapt_spatial_resampler_v2", feature_scale_mask=5),
                    "configs/uhd_v2.py:tiny"),
    "uhd_v2_dec2024": (dict(LLAMA, **MM, mm_projector_type="adapt_spatial_resampler", feature_mode="featup_muti_res",
                            feature_scale_mask=7, vdim_ckpt="ckpt/clip-large-vdim.ckpt"),
                       dict(family="uhd_v2", projector_type="adapt_spatial_resampler_v2", feature_scale_mask=7),
                       "configs/uhd_v2.py:tiny"),
    "slime": (dict(LLAMA, **dict(MM, mm_patch_merge_type="spatial", image_aspect_ratio="anyres"),
                   mm_projector_type="gated", mm_resampler_type="cosine", mm_resampler_dim=144,
                   mm_resampler_topp=0.95, mm_resampler_temp=1.0, mm_learnable_gated=-1, seperator=1919,
                   image_grid_pinpoints=[[336, 672], [672, 336]]),
              dict(family="slime", projector_type="gated",
                   slime=dict(views="both", expert=-1, topp=0.95, temperature=1.0, separator_id=1919, local_grid=12)),
              "configs/slime.py:tiny"),
    "llava15": (dict(LLAMA, **MM, mm_projector_type="mlp2x_gelu"), dict(family="llava15", projector_type="mlp2x_gelu"),
                "configs/llava15.py:tiny"),
    # LLaVA v1 code (mid-2023): no mm_projector_type, a Linear, mm_use_im_start_end; 32000 + 3 tokens in a real one
    "llavar": (dict(LLAMA, model_type="llava", architectures=["LlavaLlamaForCausalLM"], vocab_size=131,
                    mm_vision_tower="openai/clip-vit-large-patch14-336", mm_hidden_size=1024, mm_vision_select_layer=-2,
                    use_mm_proj=True, mm_use_im_start_end=True, sep_image_conv_front=False, tune_mm_mlp_adapter=False,
                    freeze_mm_mlp_adapter=False),
               dict(family="llavar", projector_type="linear"), "configs/llavar.py:tiny"),
}


def original_dir(path, cfg: dict, vision: bool = True):
    """An original-layout checkpoint: its config.json and a few of its tensor names (sizes do not matter here)."""
    os.makedirs(path, exist_ok=True)
    keys = ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight", "lm_head.weight",
            "model.mm_projector.proj"]
    if vision:
        keys.append("model.vision_tower.vision_tower.vision_model.embeddings.class_embedding")
    save_file({k: torch.zeros(2) for k in keys}, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return str(path)


@pytest.mark.parametrize("name", sorted(ORIGINALS))
def test_config_json_of_each_original_builds_its_model(name, tmp_path):
    cfg, want, experiment = ORIGINALS[name]
    model, _, family = model_for_sources([Source(original_dir(tmp_path / "ckpt", cfg))], None)
    assert family == want["family"] == load_config(experiment).family
    assert model["projector_type"] == want["projector_type"] == load_config(experiment).model.projector_type
    for key in ("feature_scale_mask", "slime"):
        if key in want:
            got = model[key] if key != "slime" else {k: model[key][k] for k in want[key]}
            assert got == want[key], key
    assert {k: model["vision"][k] for k in CLIP_L_336} == CLIP_L_336
    assert (model["vision"]["select_layer"], model["vision"]["select_feature"]) == (-2, "patch")
    llm = model["llm"]
    assert (llm["hidden_size"], llm["num_layers"], llm["num_heads"], llm["vocab_size"]) == (
        64, 2, 4, cfg["vocab_size"])
    qwen = cfg["model_type"] == "llava_qwen"   # Qwen2's config has no attention_bias key: q/k/v always have biases
    assert (llm["num_kv_heads"], llm["attention_bias"], llm["rope_theta"]) == ((2, True, 1e6) if qwen else
                                                                               (4, False, 1e4))
    vlm_config(model)   # a model our modules build


def test_uhd_v2_head_checkpoint_imports_without_config_bit_exact(tmp_path):
    """A tiny v2 model written in the original layout with the keys v2-head's train.py writes, imported back with no
    --config: same parameters, the mask and family from config.json."""
    from uhd_jax.models.vlm import init_fn
    from uhd_jax.train.trainer import model_for_stage

    c = load_config("configs/uhd_v2.py:tiny")
    c.model.feature_scale_mask = 7
    params = nn.meta.unbox(jax.jit(init_fn(model_for_stage(c, c.stages.sft)))(jax.random.PRNGKey(4))["params"])
    src, orig, clip, back = (str(tmp_path / n) for n in ("ours", "orig", "clip", "back"))
    save_params(src, params, {"model": c.model.to_dict(), "family": "uhd_v2"})
    assert convert_cli(["export", "--checkpoint", src, "--format", "llava_original", "--out", orig]) == 0
    assert convert_cli(["export", "--checkpoint", src, "--format", "hf_clip", "--out", clip]) == 0
    llm = c.model.llm
    cfg = dict(LLAMA, **dict(MM, mm_hidden_size=c.model.vision.hidden_size), hidden_size=llm.hidden_size,
               intermediate_size=llm.intermediate_size, num_attention_heads=llm.num_heads,
               num_key_value_heads=llm.num_kv_heads, num_hidden_layers=llm.num_layers, vocab_size=llm.vocab_size,
               mm_projector_type="adapt_spatial_resampler_v2", model_mode="uhd_v2", feature_scale_mask=7)
    json.dump(cfg, open(os.path.join(orig, "config.json"), "w"))
    assert convert_cli(["import", "--src", orig, "--vision", clip, "--out", back]) == 0
    meta = load_meta(back)
    assert meta["family"] == "uhd_v2" and meta["model"]["feature_scale_mask"] == 7
    assert meta["model"]["projector_type"] == "adapt_spatial_resampler_v2"
    got, want = flatten(load_params(back)), flatten(params)
    assert set(got) == set(want) and "projector/features_2x_projector/kernel" in got
    for k, v in want.items():
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(v), err_msg=k)


def run_cli(argv, capsys):
    try:
        rc = convert_cli(argv)
    except SystemExit as e:   # argparse's own errors
        rc = e.code
    return rc, capsys.readouterr().err


def test_common_cli_mistakes_are_one_message_with_status_2(tmp_path, capsys):
    ok = original_dir(tmp_path / "v1", ORIGINALS["uhd_v1_eccv"][0])
    no_vision = original_dir(tmp_path / "v1_no_vision", ORIGINALS["uhd_v1_eccv"][0], vision=False)
    truncated = tmp_path / "truncated"
    os.makedirs(truncated)
    data = open(os.path.join(ok, "model.safetensors"), "rb").read()
    (truncated / "model.safetensors").write_bytes(data[:len(data) - 3])
    corrupt_bin = tmp_path / "corrupt_bin"
    os.makedirs(corrupt_bin)
    (corrupt_bin / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a zip")
    bad_index = tmp_path / "bad_index"
    os.makedirs(bad_index)
    (bad_index / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-00001')
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    hf = tmp_path / "llava_hf"
    tiny_llava().save_pretrained(hf)
    uhd = tmp_path / "uhd_ckpt"   # verify reads the model from config.json before any tensor
    os.makedirs(uhd)
    (uhd / "config.json").write_text(json.dumps({"model": load_config("configs/uhd_v1.py:tiny").model.to_dict()}))
    llava15 = tmp_path / "llava15_ckpt"
    os.makedirs(llava15)
    (llava15 / "config.json").write_text(json.dumps({"model": load_config("configs/llava15.py:tiny").model.to_dict(),
                                                     "family": "llava15"}))
    tokenizer = llama_style(str(tmp_path / "tokenizer"), 128)
    out = str(tmp_path / "out")
    cases = [
        (["import", "--src", str(tmp_path / "missing"), "--out", out], ["missing' does not exist"]),
        (["export", "--checkpoint", ok, "--format", "onnx", "--out", out], ["--format", "invalid choice: 'onnx'"]),
        (["import", "--src", ok, "--config", "configs/uhd_v1.py:13B", "--out", out],
         ["configs/uhd_v1.py", "unknown variant '13B'"]),
        (["import", "--src", ok, "--config", "configs/uhd_v9.py:13b", "--out", out],
         ["config file 'configs/uhd_v9.py' not found"]),
        (["import", "--src", no_vision, "--out", out],
         [no_vision, "no vision tower", "pass --vision", "openai/clip-vit-large-patch14-336"]),
        (["import", "--src", ok, "--out", str(a_file / "sub")], [str(a_file), "is a file"]),
        (["import", "--src", str(truncated), "--out", out], [str(truncated / "model.safetensors"), "corrupt or truncated"]),
        (["import", "--src", str(corrupt_bin), "--out", out], [str(corrupt_bin / "pytorch_model.bin")]),
        (["import", "--src", str(bad_index), "--out", out], [str(bad_index / "model.safetensors.index.json"),
                                                              "not valid JSON"]),
        (["verify", "--checkpoint", str(uhd), "--torch", str(hf)],
         ["projector_type is 'adapt_spatial_resampler' in the checkpoint but 'mlp2x_gelu'", str(hf)]),
        (["export", "--checkpoint", str(llava15), "--format", "llava_hf", "--out", out],
         ["llava_hf needs the model's tokenizer", "records no tokenizer", "pass --tokenizer DIR"]),
        (["export", "--checkpoint", str(uhd), "--format", "llava_hf", "--tokenizer", tokenizer, "--out", out],
         ["only the mlp2x_gelu projector", "'adapt_spatial_resampler'", "--format llava_original"]),
        (["export", "--checkpoint", str(uhd), "--format", "hf_llama", "--tokenizer", str(a_file), "--out", out],
         [f"--tokenizer {a_file} is not a directory"]),
        (["export", "--checkpoint", str(uhd), "--format", "hf_clip", "--tokenizer", tokenizer, "--out", out],
         ["--tokenizer", "hf_clip holds no language model"]),
        (["export", "--checkpoint", str(uhd), "--format", "hf_llama", "--image-token-index", "5", "--out", out],
         ["--image-token-index is for --format llava_hf"]),
        (["import", "--src", ok, "--tokenizer", str(tmp_path), "--out", out],
         [f"--tokenizer {tmp_path} is not a tokenizer directory"]),
    ]
    capsys.readouterr()   # transformers' save progress
    for argv, needles in cases:
        rc, err = run_cli(argv, capsys)
        assert rc == 2, (argv, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (argv, err)
        for needle in needles:
            assert needle in err, (argv, needle, err)
    assert not os.path.exists(out)


def test_corrupt_checkpoint_exits_2_without_traceback_from_the_shell(tmp_path):
    ckpt = original_dir(tmp_path / "ckpt", ORIGINALS["llava15"][0])
    path = os.path.join(ckpt, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:40])
    # the installed command, from a directory outside the checkout
    command = os.path.join(os.path.dirname(sys.executable), "uhd-convert")
    proc = subprocess.run([command, "import", "--src", ckpt, "--out", str(tmp_path / "out")], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and path in proc.stderr


LLAMA3 = dict(rope_theta=500000.0, rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                     original_max_position_embeddings=256))
QWEN2_LLM = dict(rope_theta=1e6, attention_bias=True)
# name: (experiment config, changes to its LLM)
EXPORTS = {"llava15": ("configs/llava15.py:tiny", {}), "llavar": ("configs/llavar.py:tiny", {}),
           "slime": ("configs/slime.py:tiny", {}), "uhd_v1": ("configs/uhd_v1.py:tiny", {}),
           "uhd_v2": ("configs/uhd_v2.py:tiny", {}), "llava15_llama3": ("configs/llava15.py:tiny", LLAMA3),
           "uhd_v2_qwen2": ("configs/uhd_v2.py:tiny", QWEN2_LLM)}


def rope_keys(llm: dict) -> dict:
    """RoPE as transformers 4 reads it (top-level rope_theta, rope_scaling)."""
    scaling = {"rope_type": "llama3", **llm["rope_scaling"]} if llm.get("rope_scaling") else None
    return dict(rope_theta=llm["rope_theta"], rope_scaling=scaling)


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_llava_original_export_writes_the_keys_the_originals_read(name, tmp_path):
    spec, llm = EXPORTS[name]
    ckpt = random_checkpoint(tmp_path / "ckpt", spec, llm)
    meta = load_meta(ckpt)
    model, family = meta["model"], meta["family"]
    out = tmp_path / "orig"
    assert convert_cli(["export", "--checkpoint", ckpt, "--format", "llava_original", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert set(MM) <= set(cfg), f"keys LLaVA-1.5's train.py writes are missing: {set(MM) - set(cfg)}"
    c = load_config(spec)
    qwen2 = bool(model["llm"].get("attention_bias"))
    want = dict(mm_projector_type=model["projector_type"], mm_hidden_size=32, mm_vision_select_layer=-2,
                mm_vision_select_feature="patch", mm_use_im_start_end=family == "llavar",
                mm_use_im_patch_token=family == "llavar", unfreeze_mm_vision_tower=True,
                image_aspect_ratio="anyres" if family == "slime" else "pad",
                tokenizer_model_max_length=c.stages[c.stage_order[-1]].max_length,
                model_type="llava_qwen" if qwen2 else "llava_llama", **rope_keys(model["llm"]))
    assert {k: cfg[k] for k in want} == want
    assert cfg["rope_parameters"]["rope_theta"] == model["llm"]["rope_theta"]
    if family == "uhd_v2":
        assert (cfg["model_mode"], cfg["feature_scale_mask"]) == ("uhd_v2", model["feature_scale_mask"])
    # the tiny tower has no hub name: mm_vision_tower is a CLIP directory of it, as the originals load one
    assert transformers.CLIPVisionConfig.from_pretrained(cfg["mm_vision_tower"]).hidden_size == 32
    hf_cls = transformers.Qwen2Config if qwen2 else transformers.LlamaConfig
    assert hf_cls.from_pretrained(out).rope_parameters["rope_theta"] == model["llm"]["rope_theta"]
    # and our import reads the same model back from these keys alone
    back, _, back_family = model_for_sources([Source(str(out))], None)
    assert back_family == family
    for key in ("projector_type", "feature_scale_mask"):
        assert back.get(key) == model.get(key), key
    assert {k: back["vision"][k] for k in model["vision"]} == model["vision"]
    if family == "slime":
        assert {k: back["slime"][k] for k in ("views", "expert", "topp", "local_grid")} == {
            k: model["slime"][k] for k in ("views", "expert", "topp", "local_grid")}
    got = {k: back["llm"].get(k) for k in ("rope_theta", "rope_scaling", "attention_bias", "num_kv_heads")}
    assert got == {k: model["llm"].get(k, False if k == "attention_bias" else None) for k in got}


@pytest.mark.parametrize("llm", ["llama3", "qwen2"])
def test_hf_exports_carry_rope_for_transformers_4_and_5_and_match_logits(llm, tmp_path):
    """hf_llama and llava_hf's text_config with Llama-3 (theta 500000, llama3 scaling) and Qwen2 (1e6, q/k/v biases):
    both RoPE spellings in config.json, transformers 5 reads the theta back, and its logits are ours (verify)."""
    changes = {"llama3": LLAMA3, "qwen2": QWEN2_LLM}[llm]
    ckpt = random_checkpoint(tmp_path / "ckpt", "configs/llava15.py:tiny", changes, seed=8)
    llava15 = tmp_path / "llava15_ckpt"
    os.makedirs(llava15)
    (llava15 / "config.json").write_text(json.dumps({"model": load_config("configs/llava15.py:tiny").model.to_dict(),
                                                     "family": "llava15"}))
    tokenizer = llama_style(str(tmp_path / "tokenizer"), 128)
    want = rope_keys(dict(load_meta(ckpt)["model"]["llm"]))
    for fmt in ("hf_llama", "llava_hf"):
        out = tmp_path / fmt
        assert convert_cli(["export", "--checkpoint", ckpt, "--format", fmt, "--out", str(out), "--tokenizer",
                            tokenizer]) == 0
        cfg = json.loads((out / "config.json").read_text())
        text = cfg["text_config"] if fmt == "llava_hf" else cfg
        assert {k: text[k] for k in want} == want
        loaded = transformers.AutoConfig.from_pretrained(out)
        loaded = loaded.text_config if fmt == "llava_hf" else loaded
        assert loaded.model_type == ("qwen2" if llm == "qwen2" else "llama")
        assert loaded.rope_parameters["rope_theta"] == want["rope_theta"]
        assert loaded.rope_parameters.get("factor") == (8.0 if llm == "llama3" else None)
        assert convert_cli(["verify", "--checkpoint", ckpt, "--torch", str(out)]) == 0


def test_llava_hf_export_names_a_tokenizer_that_splits_prompts_unlike_training(tmp_path, capsys):
    """The synthetic tokenizer marks a word start only at the start of a text: chunk-wise (ours, the original's
    tokenizer_image_token) the text after <image> gets one, tokenized whole (transformers) it does not."""
    from uhd_jax.data.synthetic import build_tokenizer

    tokenizer = str(tmp_path / "tokenizer")
    build_tokenizer(["What is written on the sign?", "USER: ASSISTANT:"] * 8, tokenizer, vocab_size=128)
    ckpt = random_checkpoint(tmp_path / "ckpt", "configs/llava15.py:tiny", tokenizer=tokenizer)
    capsys.readouterr()
    assert convert_cli(["export", "--checkpoint", ckpt, "--format", "llava_hf", "--out", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "note: the exported tokenizer splits a prompt differently from uhd-jax's chunk-wise tokenization" in out

