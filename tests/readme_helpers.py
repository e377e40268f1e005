"""What tests/test_readme_commands.py needs: the README's tested command blocks as argument lists, the size rewrite,
and a working directory laid out as "Preparing the real data" says, filled with tiny random towers (written by
transformers, as the released ones are) and a few LLaVA-format samples per data file."""
from __future__ import annotations

import json
import os
import re
import shlex

import numpy as np

MARKER = re.compile(r"<!-- tested: readme (\S+) -->")
FAMILIES = ("llava15", "uhd_v1", "uhd_v2", "slime", "llavar")


def tested_blocks(readme: str) -> dict[str, list[list[str]]]:
    """{NAME: commands} of the fenced blocks right after a `<!-- tested: readme NAME -->` line, each command an
    argument list: comments dropped, backslash continuations joined, `NAME=value` lines substituted into the
    following `$NAME`s."""
    lines = open(readme, encoding="utf-8").read().split("\n")
    blocks = {}
    for i, line in enumerate(lines):
        marked = MARKER.fullmatch(line.strip())
        if not marked:
            continue
        if i + 1 >= len(lines) or not lines[i + 1].startswith("```"):
            raise AssertionError(f"{readme}:{i + 1}: {line.strip()} is not followed by a fenced block")
        if marked.group(1) in blocks:
            raise AssertionError(f"{readme}:{i + 1}: a second block named {marked.group(1)!r}")
        end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
        blocks[marked.group(1)] = block_commands(lines[i + 2:end])
    return blocks


def block_commands(lines: list[str]) -> list[list[str]]:
    commands, variables, pending = [], {}, ""
    for line in lines:
        # `[--workers 8]`: an optional part, given (every one of them is run)
        line = re.sub(r"\[(--[^\]]*)\]", r"\1", line)
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        words = shlex.split(pending + line, comments=True)
        pending = ""
        if not words:
            continue
        if len(words) == 1 and re.fullmatch(r"[A-Za-z_]\w*=\S*", words[0]):
            name, _, value = words[0].partition("=")
            variables[name] = value
            continue
        commands.append([re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], w) for w in words])
    return commands


def tiny_size(argv: list[str]) -> list[str]:
    """The one rewrite a README command gets: its size. A shipped variant V of a config X becomes `V_tiny` (the same
    recipe at test sizes, uhd_jax/configs/common.tiny_recipe), in `configs/X.py:V` and in the names made from it
    (the run directory `runs/X-V`, the init checkpoint `X-V-init`); nothing else changes."""
    families = "|".join(FAMILIES)
    out = []
    for word in argv:
        word = re.sub(rf"(configs/(?:{families})\.py:)(\w+)\b", r"\1\2_tiny", word)
        word = re.sub(rf"(runs/(?:{families})-)(\w+?)\b", r"\1\2_tiny", word)
        out.append(re.sub(rf"\b((?:{families})-)(\w+?)(-init)\b", r"\1\2_tiny\3", word))
    return out


# --- the data layout -------------------------------------------------------------------------------------------

CAPTIONS = ["A red receipt with prices and a bar chart of sales.", "The sign says stop, 42 metres ahead.",
            "A bar chart of sales.", "A red receipt with prices."]
QUESTIONS = [("What is written on the sign?", "The sign says stop."), ("What colour is the largest bar?", "red"),
             ("Which page number is printed at the bottom left corner?", "42"),
             ("Describe the picture briefly.", "A red receipt with prices.")]
# long side / short side of the images: wide, tall and square, so UHD slices them in several grids
SIZES = [(120, 40), (40, 120), (90, 90), (160, 60), (64, 48), (48, 100), (150, 150), (70, 35)]


def write_image(path: str, i: int) -> str:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    w, h = SIZES[i % len(SIZES)]
    pixels = np.random.default_rng(i).integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_samples(root: str, json_path: str, image_folder: str, images: list[str], kind: str, text_only: int = 0):
    """`json_path` (under root) with one sample per image in `images` (paths relative to `image_folder`, which is
    relative to root) plus `text_only` samples without an image, as mix665k has."""
    samples = []
    for i, rel in enumerate(images):
        write_image(os.path.join(root, image_folder, rel), i)
        if kind == "caption":
            turns = [("human", "<image>\n"), ("gpt", CAPTIONS[i % len(CAPTIONS)])]
        else:
            q, a = QUESTIONS[i % len(QUESTIONS)]
            turns = [("human", f"<image>\n{q}"), ("gpt", a), ("human", QUESTIONS[(i + 1) % 4][0]),
                     ("gpt", QUESTIONS[(i + 1) % 4][1])]
        samples.append({"id": f"{kind}-{i}", "image": rel,
                        "conversations": [{"from": f, "value": v} for f, v in turns]})
    for i in range(text_only):
        q, a = QUESTIONS[i % len(QUESTIONS)]
        samples.append({"id": f"text-{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
    path = os.path.join(root, json_path)
    os.makedirs(os.path.dirname(path) or root, exist_ok=True)
    with open(path, "w") as f:
        json.dump(samples, f)


def write_datasets(data: str, n: int = 8) -> None:
    """Every data file and image folder the five recipes read, at the README's paths under `data` (data_root)."""
    pretrain = [f"00000/{i:09d}.jpg" for i in range(n)]
    write_samples(data, "LLaVA-Pretrain/blip_laion_cc_sbu_558k.json", "LLaVA-Pretrain/images", pretrain, "caption")
    # mix665k: image paths relative to data/ itself, over several datasets' folders, and text-only conversations
    folders = ["coco/train2017", "gqa/images", "ocr_vqa/images", "textvqa/train_images", "vg/VG_100K",
               "vg/VG_100K_2"]
    mixed = [f"{folders[i % len(folders)]}/{i:012d}.jpg" for i in range(n - 1)]
    write_samples(data, "llava_v1_5_mix665k.json", ".", mixed, "question", text_only=1)
    for i in range(n):
        write_image(os.path.join(data, "cocostuff/images/train2017", f"{i:012d}.jpg"), i)
    # SliME: ShareGPT4V's mixture reads LLaVA-Pretrain's images through the README's link, and SMR its own folders
    os.makedirs(os.path.join(data, "llava/llava_pretrain"))
    os.symlink("../../LLaVA-Pretrain/images", os.path.join(data, "llava/llava_pretrain/images"))
    share = [f"llava/llava_pretrain/images/{p}" for p in pretrain[:n // 2]] + [f"sam/images/sa_{i}.jpg"
                                                                             for i in range(n // 2)]
    write_samples(data, "sharegpt4v_mix665k_cap23k_coco-ap9k_lcs3k_sam9k_div2k.json", ".", share, "question")
    write_samples(data, "SMR/SMR.json", "SMR", [f"{d}/{i}.png" for i, d in enumerate(["ChartQA", "DVQA"] * (n // 2))],
                  "question")
    # LLaVAR: CC3M + its OCR captions, then LLaVA-Instruct on COCO + its own instructions
    write_samples(data, "LLaVA-CC3M-Pretrain-595K/chat.json", "LLaVA-CC3M-Pretrain-595K/images",
                  [f"GCC_train_{i:09d}.jpg" for i in range(n // 2)], "caption")
    write_samples(data, "LLaVAR/pretrain/chat_llavar.json", "LLaVAR/pretrain/images",
                  [f"{i}.jpg" for i in range(n // 2)], "caption")
    write_samples(data, "llava_instruct_158k.json", "coco/train2017", [f"{i:012d}.jpg" for i in range(n // 2)],
                  "question")
    write_samples(data, "LLaVAR/finetune/llava_instruct_150k_llavar_16k.json", "LLaVAR/finetune/images",
                  [f"{i}.jpg" for i in range(n // 2)], "question")


def write_towers(checkpoints: str, llm: dict, vision: dict) -> None:
    """Random Vicuna / LLaMA (`llm`: our LLM config's sizes) and CLIP (`vision`) folders at the README's names,
    saved by transformers with a Llama-style tokenizer of exactly the vocabulary's size."""
    import torch
    import transformers

    from tests.convert_helpers import llama_style

    torch.manual_seed(0)
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
        num_hidden_layers=vision["num_layers"], num_attention_heads=vision["num_heads"],
        image_size=vision["image_size"], patch_size=vision["patch_size"], layer_norm_eps=vision["layer_norm_eps"],
        hidden_act=vision["hidden_act"]))
    clip.save_pretrained(os.path.join(checkpoints, "clip-vit-large-patch14-336"))
    vicuna = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=llm["vocab_size"], hidden_size=llm["hidden_size"], intermediate_size=llm["intermediate_size"],
        num_hidden_layers=llm["num_layers"], num_attention_heads=llm["num_heads"],
        num_key_value_heads=llm["num_kv_heads"], rms_norm_eps=llm["rms_norm_eps"], rope_theta=llm["rope_theta"],
        max_position_embeddings=llm["max_position_embeddings"], bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False))
    first = os.path.join(checkpoints, "vicuna-7b-v1.5")
    vicuna.save_pretrained(first)
    llama_style(first, llm["vocab_size"])
    # the 13B and v1.1 folders: the same tiny model (the recipes differ in what they read, not in these weights)
    for name in ("vicuna-13b-v1.5", "vicuna-7b-v1.1", "vicuna-13b-v1.1"):
        os.symlink("vicuna-7b-v1.5", os.path.join(checkpoints, name))


def write_vdim(path: str, channels: int) -> None:
    """A FeatUp/VDIM Lightning .ckpt as clip-large-vdim.ckpt is saved: the JBU stack under `upsampler.` with the
    downsampler, scale net and featurizer beside it."""
    import torch

    from tests.test_uhd_v2 import TorchJBU4x, randomized

    state = {f"upsampler.{k}": v for k, v in randomized(TorchJBU4x(channels), 9).state_dict().items()}
    state.update({"downsampler.w": torch.ones(14, 14), "scale_net.0.weight": torch.ones(1, 4, 1, 1),
                  "model.0.patch.weight": torch.ones(3)})
    torch.save({"state_dict": state, "epoch": 5, "global_step": 2000}, path)


def write_textvqa(work: str, n: int = 4) -> None:
    """The Generation block's inputs in the current directory: photo.jpg, LLaVA's TextVQA question file, its image
    folder and TextVQA's annotation file."""
    write_image(os.path.join(work, "photo.jpg"), 0)
    questions, records = [], []
    for i in range(n):
        image_id = f"{i:016x}"
        write_image(os.path.join(work, "textvqa/train_images", f"{image_id}.jpg"), i)
        q = QUESTIONS[i % len(QUESTIONS)][0].lower()
        # LLaVA's TextVQA question file names each question by its image id (eval_textvqa.py matches on it)
        questions.append({"question_id": image_id, "image": f"{image_id}.jpg", "category": "default",
                          "text": f"{q}\nReference OCR token: stop, 42\nAnswer the question using a single word or "
                                  f"phrase."})
        records.append({"image_id": image_id, "question_id": 34602 + i, "question": q,
                        "answers": [QUESTIONS[i % len(QUESTIONS)][1]] * 10})
    with open(os.path.join(work, "llava_textvqa_val_v051_ocr.jsonl"), "w") as f:
        f.write("".join(json.dumps(q) + "\n" for q in questions))
    with open(os.path.join(work, "TextVQA_0.5.1_val.json"), "w") as f:
        json.dump({"dataset_name": "textvqa", "dataset_split": "val", "data": records}, f)


def write_convert_inputs(work: str, checkpoints: str, vision_hidden: int) -> None:
    """The Converting block's downloads in `work`: an original LLaVA-1.5 checkpoint (llava-v1.5-7b/: the Vicuna
    weights + model.mm_projector.*, the original's config.json keys, no vision tower), a llava-hf one
    (llava-1.5-7b-hf/, transformers' LlavaForConditionalGeneration with its tokenizer) and a stage-1
    mm_projector.bin."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from tests.convert_helpers import llama_style
    from tests.torch_helpers import tiny_llava

    vicuna = os.path.realpath(os.path.join(checkpoints, "vicuna-7b-v1.5"))
    with open(os.path.join(vicuna, "config.json")) as f:
        llm = json.load(f)
    g = torch.Generator().manual_seed(1)
    h = llm["hidden_size"]
    projector = {"model.mm_projector.0.weight": torch.randn(h, vision_hidden, generator=g) * 0.2,
                 "model.mm_projector.0.bias": torch.randn(h, generator=g) * 0.2,
                 "model.mm_projector.2.weight": torch.randn(h, h, generator=g) * 0.2,
                 "model.mm_projector.2.bias": torch.randn(h, generator=g) * 0.2}
    torch.save(projector, os.path.join(work, "mm_projector.bin"))
    original = os.path.join(work, "llava-v1.5-7b")
    shutil.copytree(vicuna, original)
    weights = load_file(os.path.join(original, "model.safetensors"))
    save_file(dict(weights, **projector), os.path.join(original, "model.safetensors"), metadata={"format": "pt"})
    # LlavaLlamaForCausalLM's config.json: the LLM's keys and the ones initialize_vision_modules and train.py add
    llm.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama", mm_projector_type="mlp2x_gelu",
               mm_vision_tower="openai/clip-vit-large-patch14-336", mm_hidden_size=vision_hidden,
               mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_patch_merge_type="flat",
               mm_use_im_start_end=False, mm_use_im_patch_token=False, use_mm_proj=True, image_aspect_ratio="pad",
               tokenizer_padding_side="right", tokenizer_model_max_length=2048, tune_mm_mlp_adapter=False)
    with open(os.path.join(original, "config.json"), "w") as f:
        json.dump(llm, f)
    hf = os.path.join(work, "llava-1.5-7b-hf")
    model = tiny_llava(seed=2, image_token_index=127)
    model.save_pretrained(hf)
    llama_style(hf, model.config.text_config.vocab_size, added=("<image>",))
