"""Our checkpoints -> directories `transformers` loads, or the original repos' layouts."""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from uhd_jax.convert import hf_configs, hf_processor, tables
from uhd_jax.convert.torch_io import SafetensorsWriter, save_torch_bin
from uhd_jax.train.param_tree import flatten, match_layer_layout
from uhd_jax.train.checkpoints import load_meta, load_params


@dataclasses.dataclass(frozen=True)
class ExportFormat:
    layout: str
    components: tuple[str, ...]
    description: str


FORMATS = {
    "llava_hf": ExportFormat("llava_hf", ("vision", "projector", "llm"), "LlavaForConditionalGeneration directory"),
    "hf_llama": ExportFormat("hf_llama", ("llm",), "LlamaForCausalLM directory (Qwen2ForCausalLM for Qwen2)"),
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


def grow_vocabulary(flat: dict, model: dict, size: int, multiple: int = 64) -> dict:
    """Rows for tokens the tokenizer gained past the model's vocabulary (llava-hf's `<image>` and `<pad>`), the
    vocabulary padded to a multiple of 64 as llava-hf's converter pads it. New embedding and lm_head rows are the mean
    of the old rows (llava-hf samples around the mean instead; the mean keeps the export deterministic, and a mean
    lm_head row never wins a greedy step). Returns the model with its new vocab_size."""
    vocab = model["llm"]["vocab_size"]
    if size <= vocab:
        return model
    new_vocab = -(-size // multiple) * multiple
    emb, head = flat["llm/embed_tokens/embedding"], flat["llm/lm_head"]
    flat["llm/embed_tokens/embedding"] = np.concatenate(
        [emb, np.repeat(emb.mean(0, keepdims=True), new_vocab - vocab, 0)], 0)
    flat["llm/lm_head"] = np.concatenate([head, np.repeat(head.mean(1, keepdims=True), new_vocab - vocab, 1)], 1)
    return dict(model, llm=dict(model["llm"], vocab_size=new_vocab))


def load_flat(checkpoint: str, meta: dict):
    """Flat float32 numpy params, layers unstacked; a QLoRA checkpoint's quantised base kernels dequantised."""
    params = jax.device_get(load_params(checkpoint))
    quant_mode = ((meta["model"].get("llm") or {}).get("lora") or {}).get("quant")
    if quant_mode:
        from uhd_jax.models.quant import dequantize_params

        params = dequantize_params(params, quant_mode)
    flat = {k: np.asarray(v, np.float32) for k, v in flatten(params).items()}
    return match_layer_layout(flat, scanned=bool(meta["model"].get("scan_layers")), want_scanned=False)


def family_recipe(meta: dict, checkpoint: str, family: str | None) -> dict:
    """The family's final training stage, which generation and evaluation follow: its template, image_aspect_ratio
    and max_length; from configs/<family>.py in the variant of the checkpoint's sizes (else its default variant).
    {} when there is no such config."""
    from uhd_jax.cli_errors import UserError, load_config
    from uhd_jax.eval.checkpoint_config import family_config

    if not family:
        return {}
    try:
        config = family_config(dict(meta, family=family), checkpoint)
    except (UserError, ValueError):
        try:
            config = load_config(f"configs/{family}.py")
        except (UserError, ValueError):
            return {}
    stage = config.stages[list(config.stage_order)[-1]]
    return dict(template=stage.template, max_length=int(stage.max_length),
                image_aspect_ratio=stage.get("image_aspect_ratio", config.data.get("image_aspect_ratio")))


def write_safetensors(flat: dict, layout_name: str, components, projector_type: str, out: str, dtype: str):
    os.makedirs(out, exist_ok=True)
    writer = SafetensorsWriter(out, dtype)
    for key, array in torch_state(flat, tables.LAYOUTS[layout_name], components, projector_type):
        writer.add(key, array)
    writer.close()


def write_config(cfg: dict, out: str, dtype: str):
    cfg["torch_dtype"] = cfg["dtype"] = dtype
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, default=str)


def write_clip(flat: dict, vision: dict, out: str, dtype: str):
    """A CLIP tower directory as the hub's openai/clip-* ones: weights, config.json and the CLIPImageProcessor config
    (the originals' CLIPVisionTower loads both from mm_vision_tower)."""
    import transformers

    write_safetensors(flat, "hf_clip", ["vision"], "", out, dtype)
    cfg = hf_configs.clip_vision_config(vision).to_dict()
    cfg["architectures"] = ["CLIPVisionModel"]
    write_config(cfg, out, dtype)
    size = vision["image_size"]
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(out)


@dataclasses.dataclass
class Exported:
    files: list[str]   # what `out` holds
    notes: list[str]   # what the user should know about the result


def _resolve_adapters(flat: dict, model: dict, adapters: str):
    from uhd_jax.models.lora import lora_config, merge_adapters
    from uhd_jax.train.param_tree import flatten, unflatten

    if adapters == "merge":
        flat = flatten(merge_adapters(unflatten(flat), lora_config(model["llm"]["lora"]).scaling))
    elif adapters == "drop":
        flat = {k: v for k, v in flat.items() if k.rsplit("/", 1)[-1] not in ("lora_a", "lora_b")}
    else:
        raise ValueError(f"adapters must be 'merge' or 'drop', got {adapters!r}")
    return flat, dict(model, llm={k: v for k, v in model["llm"].items() if k != "lora"})


def export_checkpoint(checkpoint: str, fmt: str, out: str, dtype: str = "float32",
                      image_token_index: int | None = None, tokenizer: str | None = None,
                      adapters: str = "merge") -> Exported:
    """Write `checkpoint` in format `fmt` into `out`, with the checkpoint's tokenizer (`tokenizer`, else the one it
    records; required for llava_hf). A checkpoint with LoRA adapters is exported merged (`adapters='merge'`), or as
    its base alone (`'drop'`, for `uhd-convert export-lora`'s PEFT adapter)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {sorted(FORMATS)}")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    if image_token_index is not None and fmt != "llava_hf":
        raise ValueError(f"--image-token-index is for --format llava_hf, not {fmt}")
    text = fmt in ("llava_hf", "hf_llama", "llava_original")
    if tokenizer and not text:
        raise ValueError(f"--tokenizer: format {fmt} holds no language model, so no tokenizer goes with it")
    spec = FORMATS[fmt]
    meta = load_meta(checkpoint)
    if fmt == "llava_hf":   # before any weight is read
        hf_configs.check_llava_hf_projector(meta["model"].get("projector_type", "mlp2x_gelu"))
    notes = []
    tok_dir, why = hf_processor.find_tokenizer(checkpoint, meta, tokenizer) if text else (None, "")
    if fmt == "llava_hf" and tok_dir is None:
        raise ValueError(f"format llava_hf needs the model's tokenizer (AutoProcessor loads it from the export) and "
                         f"{why}; pass --tokenizer DIR with the tokenizer the model was trained with")
    if text and tok_dir is None:
        notes.append(f"no tokenizer written: {why} (pass --tokenizer DIR to include it)")
    family = meta.get("family") or ("llava15" if fmt == "llava_hf" else None)
    flat = load_flat(checkpoint, meta)
    model, hf = meta["model"], dict(meta.get("hf", {}))
    if (model.get("llm") or {}).get("lora"):
        flat, model = _resolve_adapters(flat, model, adapters)
        notes.append("LoRA adapters merged into the weights" if adapters == "merge" else
                     "LoRA adapters left out (uhd-convert export-lora writes them as a PEFT adapter)")
        quant_mode = meta["model"]["llm"]["lora"].get("quant")
        if quant_mode:
            notes.append(f"the {quant_mode} QLoRA base dequantised to float: the base the adapters were trained on, "
                         f"not the float checkpoint it was quantised from")
    have = {k.split("/")[0] for k in flat}
    need = set(spec.components) - ({"vision"} if fmt == "llava_original" else set())
    if not need <= have:
        raise ValueError(f"{checkpoint} holds {sorted(have)}; format {fmt} needs {sorted(need)}")
    components = [c for c in spec.components if c in have]
    projector_type = model.get("projector_type", "mlp2x_gelu")
    tok = None
    if tok_dir:   # llava_hf's is saved anew: padded on the left, as batched generate() needs (our Generator pads so)
        tok = hf_processor.load_tokenizer(tok_dir, **({"padding_side": "left"} if fmt == "llava_hf" else {}))
    if fmt == "llava_hf":
        index = hf_processor.add_image_token(tok, model["llm"]["vocab_size"],
                                             hf.get("image_token_index") if image_token_index is None
                                             else image_token_index, tok_dir)
        model = grow_vocabulary(flat, model, len(tok))
        hf["image_token_index"] = index
    if tok is not None:
        hf.update(hf_processor.special_ids(tok))
    recipe = family_recipe(meta, checkpoint, family) if fmt in ("llava_hf", "llava_original") else {}

    os.makedirs(out, exist_ok=True)
    if fmt == "mm_projector":   # the originals' stage-1 files: SliME saves its sampler beside, as sampler.bin
        state = dict(torch_state(flat, tables.LAYOUTS[spec.layout], components, projector_type))
        files = {"mm_projector.bin": {k: v for k, v in state.items() if not k.startswith("model.sampler.")},
                 "sampler.bin": {k: v for k, v in state.items() if k.startswith("model.sampler.")}}
        written = []
        for name, part in files.items():
            if part:
                save_torch_bin(os.path.join(out, name), part, dtype)
                written.append(os.path.join(out, name))
        return Exported(written, notes)
    if fmt == "hf_clip":
        write_clip(flat, model["vision"], out, dtype)
        return Exported(sorted(os.listdir(out)), notes)
    if fmt == "llava_hf":
        cfg = hf_configs.llava_dict(model, hf)
    elif fmt == "hf_llama":
        cfg = hf_configs.llm_dict(model["llm"], hf)
    else:
        tower = None
        if "vision" in have and not hf_configs.is_clip_l_336(model["vision"]):
            # no hub name builds this tower: the originals get a directory of it, as they would for a local CLIP
            tower = os.path.abspath(os.path.join(out, "vision_tower"))
            write_clip(flat, model["vision"], tower, dtype)
        cfg = hf_configs.llava_original_config(model, hf, family, recipe, tower, tower_in_weights="vision" in have)
    write_safetensors(flat, spec.layout, components, projector_type, out, dtype)
    write_config(cfg, out, dtype)
    if fmt in ("llava_hf", "hf_llama") and tok is not None:
        from transformers import GenerationConfig

        GenerationConfig(**hf_processor.special_ids(tok)).save_pretrained(out)
    if fmt == "llava_hf":
        hf_processor.write_llava_processor(out, tok, model["vision"], recipe)
        if hf_processor.chat_template(recipe.get("template")) is None:
            why = (f"the family's template {recipe['template']!r} has no Jinja form here" if recipe else
                   f"configs/{family}.py, which names the template, was not found")
            notes.append(f"no chat template written: {why}; build prompts as uhd_jax.data.templates renders them")
        n = hf_configs.llava_config(model, hf).image_seq_length
        note = hf_processor.image_split_note(tok, recipe.get("template"), hf["image_token_index"], n)
        if note:
            notes.append(note)
    elif tok_dir:
        hf_processor.copy_tokenizer(tok_dir, out)
    return Exported(sorted(os.listdir(out)), notes)
