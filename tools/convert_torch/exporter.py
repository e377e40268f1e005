"""Our checkpoints -> directories `transformers` loads, or the original repos' layouts."""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from tools.convert_torch import hf_configs, tables
from tools.convert_torch.torch_io import SafetensorsWriter, save_torch_bin
from uhd_jax.train.param_tree import flatten, match_layer_layout
from uhd_jax.train.checkpoints import load_meta, load_params


@dataclasses.dataclass(frozen=True)
class ExportFormat:
    layout: str
    components: tuple[str, ...]
    description: str


FORMATS = {
    "llava_hf": ExportFormat("llava_hf", ("vision", "projector", "llm"), "LlavaForConditionalGeneration directory"),
    "hf_llama": ExportFormat("hf_llama", ("llm",), "LlamaForCausalLM directory"),
    "hf_clip": ExportFormat("hf_clip", ("vision",), "CLIPVisionModel directory"),
    "llava_original": ExportFormat("llava_original", ("vision", "projector", "llm"),
                                   "original LLaVA layout (model.mm_projector.*, model.layers.*, vision tower)"),
    "mm_projector": ExportFormat("mm_projector", ("projector",), "stage-1 mm_projector.bin"),
}


def torch_state(flat: dict, layout: tables.Layout, components, projector_type: str):
    """Yield (torch key, array) for every parameter of `components`; raise if one has no rule."""
    unmapped = []
    for path, value in flat.items():
        comp, rel = path.split("/", 1)
        if comp not in components:
            continue
        for c in layout.components:
            if c.ours != comp:
                continue
            rule = next((r for r in c.rules(projector_type) if r.match_ours(rel) is not None), None)
            if rule is not None:
                yield c.prefixes[0] + rule.match_ours(rel), rule.transform.to_torch(np.asarray(value))
                break
        else:
            unmapped.append(path)
    if unmapped:
        raise ValueError(f"layout {layout.name!r} has no name for these parameters: {unmapped}")


def add_image_and_pad_tokens(flat: dict, model: dict, hf: dict, multiple: int = 64):
    """llava-hf's convention for original LLaVA checkpoints: `<image>` = old vocab size, `<pad>` = +1, vocabulary
    padded to a multiple of 64. New embedding and lm_head rows are the mean of the old rows (llava-hf samples around
    the mean instead; the mean keeps the export deterministic)."""
    vocab = model["llm"]["vocab_size"]
    new_vocab = -(-(vocab + 2) // multiple) * multiple
    emb, head = flat["llm/embed_tokens/embedding"], flat["llm/lm_head"]
    flat["llm/embed_tokens/embedding"] = np.concatenate(
        [emb, np.repeat(emb.mean(0, keepdims=True), new_vocab - vocab, 0)], 0)
    flat["llm/lm_head"] = np.concatenate([head, np.repeat(head.mean(1, keepdims=True), new_vocab - vocab, 1)], 1)
    model = dict(model, llm=dict(model["llm"], vocab_size=new_vocab))
    return model, dict(hf, image_token_index=vocab, pad_token_id=vocab + 1)


def load_flat(checkpoint: str):
    meta = load_meta(checkpoint)
    params = jax.device_get(load_params(checkpoint))
    flat = {k: np.asarray(v, np.float32) for k, v in flatten(params).items()}
    return meta, match_layer_layout(flat, scanned=bool(meta["model"].get("scan_layers")), want_scanned=False)


def export_checkpoint(checkpoint: str, fmt: str, out: str, dtype: str = "float32",
                      image_token_index: int | None = None) -> list[str]:
    """Write `checkpoint` in format `fmt` into `out`; returns the files written."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {sorted(FORMATS)}")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    spec = FORMATS[fmt]
    meta, flat = load_flat(checkpoint)
    model, hf = meta["model"], dict(meta.get("hf", {}))
    if image_token_index is not None:
        hf["image_token_index"] = image_token_index
    have = {k.split("/")[0] for k in flat}
    need = set(spec.components) - ({"vision"} if fmt == "llava_original" else set())
    if not need <= have:
        raise ValueError(f"{checkpoint} holds {sorted(have)}; format {fmt} needs {sorted(need)}")
    components = [c for c in spec.components if c in have]
    if fmt == "llava_hf" and "image_token_index" not in hf:
        model, hf = add_image_and_pad_tokens(flat, model, hf)
    layout = tables.LAYOUTS[spec.layout]
    projector_type = model.get("projector_type", "mlp2x_gelu")
    state = torch_state(flat, layout, components, projector_type)
    os.makedirs(out, exist_ok=True)

    if fmt == "mm_projector":   # the originals' stage-1 files: SliME saves its sampler beside, as sampler.bin
        state = dict(state)
        files = {"mm_projector.bin": {k: v for k, v in state.items() if not k.startswith("model.sampler.")},
                 "sampler.bin": {k: v for k, v in state.items() if k.startswith("model.sampler.")}}
        written = []
        for name, part in files.items():
            if part:
                save_torch_bin(os.path.join(out, name), part, dtype)
                written.append(os.path.join(out, name))
        return written
    writer = SafetensorsWriter(out, dtype)
    for key, array in state:
        writer.add(key, array)
    writer.close()
    if fmt == "llava_hf":
        cfg = hf_configs.llava_config(model, hf).to_dict()
    elif fmt == "hf_llama":
        cfg = hf_configs.llama_config(model["llm"], hf).to_dict()
    elif fmt == "hf_clip":
        cfg = hf_configs.clip_vision_config(model["vision"]).to_dict()
    else:
        cfg = hf_configs.llava_original_config(model, hf, meta.get("family"))
    cfg["torch_dtype"] = cfg["dtype"] = dtype
    if fmt == "hf_clip":
        cfg["architectures"] = ["CLIPVisionModel"]
    elif fmt == "hf_llama":
        cfg["architectures"] = ["LlamaForCausalLM"]
    elif fmt == "llava_hf":
        cfg["architectures"] = ["LlavaForConditionalGeneration"]
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, default=str)
    return sorted(os.listdir(out))
