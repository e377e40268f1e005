"""LLaVA-1.5 end to end against transformers, conversion round trips both ways, and bad checkpoints."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from tests.convert_helpers import llama_style, random_checkpoint
from tests.torch_helpers import random_pixels, rel_err, tiny_llava, to_nchw
from uhd_jax.convert.cli import main as convert_cli
from uhd_jax.convert.importer import CheckpointMismatchError, Source, import_checkpoint
from uhd_jax.train.param_tree import flatten
from uhd_jax.config_loading import load_config
from uhd_jax.models.config import vlm_config
from uhd_jax.models.vlm import VLM
from uhd_jax.train.checkpoints import load_meta, load_params

IMAGE_TOKEN = 127
N_IMAGE_TOKENS = 16  # 56 px / 14 = 4 x 4 patches


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    ref = tiny_llava(seed=7, image_token_index=IMAGE_TOKEN)
    src = tmp_path_factory.mktemp("llava_hf")
    ref.save_pretrained(src)
    llama_style(str(src), 128, added=("<image>",))   # its tokenizer beside it, as on the hub: <image> = 127
    ckpt = tmp_path_factory.mktemp("ours") / "ckpt"
    assert convert_cli(["import", "--src", str(src), "--out", str(ckpt)]) == 0
    return ref, str(src), str(ckpt)


def load_ours(ckpt):
    meta = load_meta(ckpt)
    model = VLM(vlm_config(dict(meta["model"], dtype="float32")))
    return model, {"params": load_params(ckpt)}, meta


def prompt_batch():
    """Two samples: BOS, text, 16 image slots, text; the second right-padded by 3."""
    rng = np.random.default_rng(11)
    ids = np.concatenate([[1], rng.integers(3, 120, 5), [IMAGE_TOKEN] * N_IMAGE_TOKENS, rng.integers(3, 120, 7)])
    ids = np.stack([ids, np.concatenate([ids[:-3], [0, 0, 0]])]).astype(np.int64)
    valid = np.ones(ids.shape, bool)
    valid[1, -3:] = False
    image_map = np.full(ids.shape, -1, np.int32)
    for b in range(2):
        slots = np.flatnonzero(ids[b] == IMAGE_TOKEN)
        image_map[b, slots] = np.arange(len(slots))
    return ids, valid, image_map


def test_llava15_logits_match_transformers(llava):
    ref, _, ckpt = llava
    model, params, _ = load_ours(ckpt)
    ids, valid, image_map = prompt_batch()
    pixels = random_pixels(2, 56, 56, seed=12)
    with torch.no_grad():
        expected = ref(input_ids=torch.from_numpy(ids), pixel_values=to_nchw(pixels),
                       attention_mask=torch.from_numpy(valid.astype(np.int64))).logits.numpy()
    positions = np.maximum(np.cumsum(valid, 1) - 1, 0)
    logits, _ = model.apply(params, jnp.asarray(ids), jnp.asarray(valid), jnp.asarray(positions),
                            jnp.asarray(pixels[:, None]), jnp.asarray(image_map))
    assert rel_err(np.asarray(logits)[valid], expected[valid]) <= 1e-5


def test_llava_hf_round_trip_is_bit_exact(llava, tmp_path):
    ref, src, ckpt = llava
    out = tmp_path / "export"
    assert convert_cli(["export", "--checkpoint", ckpt, "--format", "llava_hf", "--out", str(out)]) == 0
    back = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
    want, got = ref.state_dict(), back.state_dict()
    assert sorted(want) == sorted(got)
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert back.config.image_token_index == IMAGE_TOKEN
    assert load_meta(ckpt)["tokenizer"] == src   # recorded at import: the hub directory holds its tokenizer
    processor = transformers.AutoProcessor.from_pretrained(out)   # the same <image>: no row added
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN and len(processor.tokenizer) == 128


@pytest.mark.parametrize("fmt", ["hf_llama", "hf_clip", "llava_original"])
def test_every_export_format_reimports_bit_exact(llava, tmp_path, fmt):
    _, _, ckpt = llava
    out = tmp_path / fmt
    assert convert_cli(["export", "--checkpoint", ckpt, "--format", fmt, "--out", str(out)]) == 0
    ours = {k: np.asarray(v) for k, v in flatten(load_params(ckpt)).items()}
    args = ["import", "--src", str(out), "--out", str(tmp_path / "again"), "--config", "configs/llava15.py:tiny"]
    if fmt == "llava_original":  # the original layout stores the tower under model.vision_tower.vision_tower
        assert any(k.startswith("model.vision_tower.vision_tower.vision_model.") for k in
                   load_file(out / "model.safetensors"))
    assert convert_cli(args) == 0
    again = flatten(load_params(tmp_path / "again"))
    assert again, "nothing re-imported"
    for key, value in again.items():
        np.testing.assert_array_equal(np.asarray(value), ours[key], err_msg=key)


def test_hf_exports_load_in_transformers(llava, tmp_path):
    ref, _, ckpt = llava
    for fmt, cls, part in [("hf_llama", transformers.LlamaForCausalLM, None),
                           ("hf_clip", transformers.CLIPVisionModel, None)]:
        out = tmp_path / fmt
        assert convert_cli(["export", "--checkpoint", ckpt, "--format", fmt, "--out", str(out)]) == 0
        loaded = cls.from_pretrained(out).state_dict()
        source = ref.model.language_model if fmt == "hf_llama" else ref.model.vision_tower
        for key, value in source.state_dict().items():
            name = key if fmt == "hf_clip" else f"model.{key}"
            assert torch.equal(loaded[name], value), name
        if fmt == "hf_llama":
            assert torch.equal(loaded["lm_head.weight"], ref.lm_head.weight)


def test_bf16_export_rounds_once(llava, tmp_path):
    ref, _, ckpt = llava
    out = tmp_path / "bf16"
    assert convert_cli(["export", "--checkpoint", ckpt, "--format", "mm_projector", "--dtype", "bfloat16",
                        "--out", str(out)]) == 0
    state = torch.load(out / "mm_projector.bin", weights_only=True)
    assert set(state) == {f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    assert state["model.mm_projector.2.weight"].dtype == torch.bfloat16
    want = ref.model.multi_modal_projector.linear_2.weight.to(torch.bfloat16)
    assert torch.equal(state["model.mm_projector.2.weight"], want)


def original_layout(ref, tmp_path):
    """An original-repo LLaVA-1.5 checkpoint: projector + LLM in one file, CLIP tower in its own directory."""
    main, clip = tmp_path / "llava-v1.5-tiny", tmp_path / "clip"
    state = {}
    for key, value in ref.state_dict().items():
        if key.startswith("model.language_model."):
            state["model." + key[len("model.language_model."):]] = value
        elif key.startswith("model.multi_modal_projector.linear_"):
            idx = 2 * (int(key.split("linear_")[1][0]) - 1)
            state[f"model.mm_projector.{idx}.{key.rsplit('.', 1)[1]}"] = value
        elif key == "lm_head.weight":
            state[key] = value
    os.makedirs(main)
    save_file({k: v.contiguous() for k, v in state.items()}, main / "model.safetensors", metadata={"format": "pt"})
    llama_style(str(main), 128)   # Vicuna's: as many tokens as the vocabulary, no <image>
    text = ref.config.text_config.to_dict()
    cfg = dict(text, model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"], mm_projector_type="mlp2x_gelu",
               mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_hidden_size=32,
               mm_vision_tower="openai/clip-vit-large-patch14-336", image_aspect_ratio="pad")
    (main / "config.json").write_text(json.dumps(cfg))
    tower = transformers.CLIPVisionModel(ref.config.vision_config)
    tower.load_state_dict(ref.model.vision_tower.state_dict())
    tower.save_pretrained(clip)
    return main, clip


def test_original_llava_checkpoint_with_separate_clip_matches(llava, tmp_path):
    ref, _, llava_ckpt = llava
    main, clip = original_layout(ref, tmp_path)
    out = tmp_path / "ours"
    assert convert_cli(["import", "--src", str(main), "--vision", str(clip), "--out", str(out)]) == 0
    ours, expected = flatten(load_params(out)), flatten(load_params(llava_ckpt))
    assert sorted(ours) == sorted(expected)
    for key in ours:
        np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(expected[key]), err_msg=key)
    assert load_meta(out)["model"]["vision"]["num_layers"] == 3  # from the CLIP config, not the tower name


def test_stage1_mm_projector_bin_alone(llava, tmp_path):
    ref, _, _ = llava
    path = tmp_path / "mm_projector.bin"
    torch.save({"model.mm_projector.0.weight": ref.model.multi_modal_projector.linear_1.weight.detach(),
                "model.mm_projector.0.bias": ref.model.multi_modal_projector.linear_1.bias.detach(),
                "model.mm_projector.2.weight": ref.model.multi_modal_projector.linear_2.weight.detach(),
                "model.mm_projector.2.bias": ref.model.multi_modal_projector.linear_2.bias.detach()}, path)
    out = tmp_path / "proj"
    assert convert_cli(["import", "--src", str(path), "--config", "configs/llava15.py:tiny", "--out", str(out)]) == 0
    meta = load_meta(out)   # generation takes the variant as recorded instead of matching sizes
    assert (meta["family"], meta["variant"]) == ("llava15", "tiny") and "tokenizer" not in meta
    params = load_params(out)
    assert set(params) == {"projector"}
    np.testing.assert_array_equal(np.asarray(params["projector"]["dense_1"]["kernel"]),
                                  ref.model.multi_modal_projector.linear_2.weight.detach().numpy().T)


def test_projector_without_config_is_refused_clearly(tmp_path):
    path = tmp_path / "mm_projector.bin"
    torch.save({"model.mm_projector.0.weight": torch.zeros(4, 4)}, path)
    with pytest.raises(ValueError, match="pass --config"):
        import_checkpoint([Source(str(path))], {})


def test_bad_checkpoint_lists_missing_extra_and_misshaped_at_once(llava, tmp_path):
    _, src, _ = llava
    state = load_file(os.path.join(src, "model.safetensors"))
    del state["multi_modal_projector.linear_2.bias"]
    state["language_model.model.layers.0.mlp.extra_proj.weight"] = torch.zeros(3, 3)
    state["language_model.model.layers.1.self_attn.q_proj.weight"] = torch.zeros(16, 32)
    bad = tmp_path / "bad"
    os.makedirs(bad)
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    model = load_config("configs/llava15.py:tiny").model.to_dict()
    with pytest.raises(CheckpointMismatchError) as info:
        import_checkpoint([Source(str(bad))], model)
    err = info.value
    assert [k for k, _ in err.missing] == ["projector/dense_1/bias"]
    assert [k for k, _ in err.unexpected] == ["language_model.model.layers.0.mlp.extra_proj.weight"]
    assert [(k, g, e) for k, _, g, e in err.misshaped] == [
        ("language_model.model.layers.1.self_attn.q_proj.weight", (16, 32), (32, 32))]
    msg = str(err)
    for needle in ("multi_modal_projector.linear_2.bias", "extra_proj", "q_proj.weight", str(bad)):
        assert needle in msg


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    assert convert_cli(["import", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("naming", ["hub_classic", "in_memory"])
def test_llava_hf_key_namings_import_identically(llava, tmp_path, naming):
    """llava-hf hub files (vision_tower.vision_model.*) and transformers' in-memory names (model.language_model.*)."""
    ref, src, ckpt = llava
    if naming == "in_memory":
        state = dict(ref.state_dict())
    else:
        state = {("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k): v
                 for k, v in load_file(os.path.join(src, "model.safetensors")).items()}
    d = tmp_path / naming
    os.makedirs(d)
    save_file({k: v.contiguous() for k, v in state.items()}, d / "model.safetensors", metadata={"format": "pt"})
    (d / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    out = tmp_path / "ours"
    assert convert_cli(["import", "--src", str(d), "--out", str(out)]) == 0
    got, want = flatten(load_params(out)), flatten(load_params(ckpt))
    assert sorted(got) == sorted(want)
    for key in got:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)


def test_original_llava_exports_to_llava_hf_with_added_image_token(llava, tmp_path):
    ref, _, _ = llava
    main, clip = original_layout(ref, tmp_path)
    ours, out = tmp_path / "ours", tmp_path / "hf"
    assert convert_cli(["import", "--src", str(main), "--vision", str(clip), "--out", str(ours)]) == 0
    assert convert_cli(["export", "--checkpoint", str(ours), "--format", "llava_hf", "--out", str(out)]) == 0
    back = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert back.config.image_token_index == 128 and back.config.text_config.pad_token_id == 129
    assert back.config.text_config.vocab_size == 192  # 128 + 2 padded to a multiple of 64
    ids, valid, _ = prompt_batch()
    new_ids = np.where(ids == IMAGE_TOKEN, 128, ids)
    pixels = to_nchw(random_pixels(2, 56, 56, seed=12))
    mask = torch.from_numpy(valid.astype(np.int64))
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids), pixel_values=pixels, attention_mask=mask).logits.numpy()
        got = back(input_ids=torch.from_numpy(new_ids), pixel_values=pixels, attention_mask=mask).logits.numpy()
    assert rel_err(got[..., :128][valid], want[valid]) <= 1e-5


def test_verify_command_measures_each_family(llava, tmp_path, capsys):
    ref, src, ckpt = llava
    assert convert_cli(["verify", "--checkpoint", ckpt, "--torch", src]) == 0
    for fmt in ("hf_llama", "hf_clip"):
        out = tmp_path / fmt
        assert convert_cli(["export", "--checkpoint", ckpt, "--format", fmt, "--out", str(out)]) == 0
        assert convert_cli(["verify", "--checkpoint", ckpt, "--torch", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("within tolerance") == 3
    # A corrupted checkpoint fails the check.
    broken = tmp_path / "broken"
    state = load_file(os.path.join(src, "model.safetensors"))
    state["multi_modal_projector.linear_1.weight"] = state["multi_modal_projector.linear_1.weight"] * 1.01
    os.makedirs(broken)
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    (broken / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    assert convert_cli(["verify", "--checkpoint", ckpt, "--torch", str(broken)]) == 1


def test_llava_hf_export_generates_our_tokens_with_transformers_processor(tmp_path):
    """The exported directory as a llava-hf release is used: AutoProcessor (tokenizer with <image>, padded-square
    image processing, chat template) + generate() give the tokens our Generator gives from our preprocessing."""
    from PIL import Image

    from uhd_jax.data.pipeline import Source
    from uhd_jax.data.templates import get_template
    from uhd_jax.eval.decoding import GenerationConfig
    from uhd_jax.eval.generate import Generator
    from uhd_jax.train.trainer import model_for_stage, preparer_factory

    tok_dir = llama_style(str(tmp_path / "tokenizer"), 128)
    ckpt = random_checkpoint(tmp_path / "final", "configs/llava15.py:tiny", seed=5, tokenizer=tok_dir)
    out = tmp_path / "hf"
    assert convert_cli(["export", "--checkpoint", ckpt, "--format", "llava_hf", "--out", str(out)]) == 0

    image = Image.fromarray(np.random.default_rng(6).integers(0, 256, (40, 90, 3), np.uint8))   # wide: padded
    os.makedirs(tmp_path / "images")
    image.save(tmp_path / "images" / "sign.png")
    turn = [{"from": "human", "value": "What is written on the sign?\n<image>"}]
    c = load_config("configs/llava15.py:tiny")
    c.tokenizer = tok_dir
    cfg = model_for_stage(c, c.stages.sft)
    prep = preparer_factory(c, c.stages.sft, cfg)(Source("", str(tmp_path / "images")))
    ours = prep.prompt({"image": "sign.png", "conversations": turn + [{"from": "gpt", "value": ""}]})
    new = 12
    answer = Generator(cfg, load_params(ckpt), prep.tokenizer, GenerationConfig(max_new_tokens=new),
                       batch_size=1).token_ids([ours])[0]

    processor = transformers.AutoProcessor.from_pretrained(out)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is written on the sign?"},
                                             {"type": "image"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == get_template("vicuna_v1").prompt(turn, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    image_id = model.config.image_token_index
    assert image_id == 128 and model.config.text_config.vocab_size == 192
    np.testing.assert_array_equal(inputs["input_ids"][0].numpy(), np.where(ours["image_map"] >= 0, image_id,
                                                                            ours["ids"]))
    np.testing.assert_allclose(inputs["pixel_values"][0].numpy().transpose(1, 2, 0), ours["pixels"][0], atol=1e-5)
    with torch.no_grad():
        theirs = model.generate(**inputs, max_new_tokens=new, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    theirs = theirs.numpy()
    eos = np.flatnonzero(theirs == prep.tokenizer.eos_token_id)
    assert len(answer) >= 4, "EOS came almost at once: too few tokens compared"
    np.testing.assert_array_equal(answer, theirs[:eos[0]] if len(eos) else theirs)
