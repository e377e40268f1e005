"""LoRA adapters <-> PEFT adapter directories (`adapter_config.json` + `adapter_model.safetensors|.bin`).

Names follow `peft.PeftModel` on the transformers model the adapter belongs to: `base_model.model.` + the module
path + `.lora_A.weight` (rank, in) / `.lora_B.weight` (out, rank). The original LLaVA LoRA trainings
(LlavaLlamaForCausalLM) and LlamaForCausalLM share `base_model.model.model.layers.{i}.`; llava-hf's
LlavaForConditionalGeneration nests the decoder at `base_model.model.model.language_model.layers.{i}.`. The
originals save the fully trained projector beside the adapter as `non_lora_trainables.bin`
(`base_model.model.model.mm_projector.*`).
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from uhd_jax.convert import tables
from uhd_jax.convert import transforms as T
from uhd_jax.convert.torch_io import _torch_tensor, iter_tensors, list_keys
from uhd_jax.models.lora import TARGETS

MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
TORCH_TARGETS = {m.rsplit(".", 1)[1]: t for t, m in MODULES.items()}   # 'q_proj' -> 'q'
LAYER_PREFIXES = {"hf_llama": "base_model.model.model.layers.", "llava_original": "base_model.model.model.layers.",
                  "llava_hf": "base_model.model.model.language_model.layers."}
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_OURS = re.compile(r"llm/layers_(\d+)/(?:attn/)?(q|k|v|o|gate|up|down)/lora_(a|b)")
_TORCH = re.compile(r"(?:base_model\.model\.)?model\.(?:language_model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj"
                    r"\.lora_(A|B)(?:\.default)?\.weight")


def _transform(target: str, which: str) -> T.Linear:
    # A is (in..., rank): o's input is (heads, head_dim); B is (rank, out...): one input dim
    return T.Linear(2 if which == "a" and target == "o" else 1)


def our_path(layer: int, target: str, which: str) -> str:
    return f"llm/layers_{layer}/{'attn/' if target in ('q', 'k', 'v', 'o') else ''}{target}/lora_{which}"


def to_peft(flat: dict, layout: str) -> dict[str, np.ndarray]:
    """Our (unscanned, flat) adapters -> PEFT's tensors for a base of `layout`."""
    prefix = LAYER_PREFIXES[layout]
    out = {}
    for path, value in flat.items():
        m = _OURS.fullmatch(path)
        if m:
            i, target, which = m.groups()
            out[f"{prefix}{i}.{MODULES[target]}.lora_{which.upper()}.weight"] = _transform(target, which).to_torch(
                np.asarray(value))
    return out


def adapter_config(lora: dict, layout: str, base: str = "") -> dict:
    """PEFT's LoraConfig as JSON. A llava-hf base also has CLIP q/k/v projections: a regex keeps the adapters on the
    language model's layers only."""
    modules = [MODULES[t].rsplit(".", 1)[1] for t in lora.get("targets", TARGETS)]
    if layout == "llava_hf":
        target_modules = r".*language_model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(modules) + ")"
    else:
        target_modules = modules
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": int(lora["rank"]),
            "lora_alpha": float(lora["alpha"]), "lora_dropout": float(lora.get("dropout", 0.0)),
            "target_modules": target_modules, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "modules_to_save": None, "inference_mode": True, "init_lora_weights": True}


def write_adapter(flat: dict, lora: dict, layout: str, out: str, dtype: str = "float32", base: str = "") -> list:
    from safetensors.torch import save_file

    if layout not in LAYER_PREFIXES:
        raise ValueError(f"PEFT adapters export for a {sorted(LAYER_PREFIXES)} base, not {layout!r}")
    tensors = to_peft(flat, layout)
    if not tensors:
        raise ValueError("the checkpoint holds no LoRA adapters (llm/.../lora_a|lora_b)")
    os.makedirs(out, exist_ok=True)
    save_file({k: _torch_tensor(v, dtype) for k, v in tensors.items()},
              os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(adapter_config(lora, layout, base), f, indent=2)
    return ["adapter_config.json", "adapter_model.safetensors"]


def read_adapter_config(src: str) -> dict:
    """adapter_config.json -> our lora section {rank, alpha, dropout, targets}; one line for what we cannot apply."""
    path = os.path.join(src, "adapter_config.json")
    if not os.path.exists(path):
        raise ValueError(f"{src} is not a PEFT adapter directory: no adapter_config.json")
    with open(path) as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r}; only LORA adapters import")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise ValueError(f"{path}: per-module {key} {cfg[key]} is not supported (one rank and alpha for all)")
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if cfg.get(key):
            raise ValueError(f"{path}: {key}=true is not supported")
    modules = cfg.get("target_modules") or []
    if isinstance(modules, str):   # a regex (our llava_hf exports write one): the tensors' names say what it matched
        modules = [MODULES[t].rsplit(".", 1)[1] for t in tensor_targets(src)]
        if not modules:
            raise ValueError(f"{path}: target_modules {cfg['target_modules']!r} matched no LLM q/k/v/o/gate/up/down "
                             f"layer in {adapter_file(src)}")
    unknown = sorted(set(modules) - set(TORCH_TARGETS))
    if unknown:
        raise ValueError(f"{path}: target_modules {unknown} are not LLM linear layers we adapt "
                         f"({sorted(TORCH_TARGETS)})")
    targets = tuple(t for t in TARGETS if t in {TORCH_TARGETS[m] for m in modules})
    return dict(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0.0)),
                targets=targets)


def adapter_file(src: str) -> str:
    for name in ADAPTER_FILES:
        if os.path.exists(os.path.join(src, name)):
            return os.path.join(src, name)
    raise ValueError(f"{src}: no adapter weights ({' or '.join(ADAPTER_FILES)})")


def tensor_targets(src: str) -> tuple[str, ...]:
    """The LLM targets the adapter file's tensors adapt, in our order (names only: nothing is read)."""
    found = set()
    for key in list_keys(adapter_file(src)):
        m = _TORCH.fullmatch(key)
        if m and m.group(3) + "_proj" in TORCH_TARGETS:
            found.add(TORCH_TARGETS[m.group(3) + "_proj"])
    return tuple(t for t in TARGETS if t in found)


def _shape_problem(key: str, have: tuple, want: tuple, which: str) -> tuple[str, str]:
    """('rank' | 'base', description) for an adapter tensor of another shape: A is (rank, in), B (out, rank)."""
    r_axis = 0 if which == "a" else 1
    if len(have) == 2 and have[1 - r_axis] == want[1 - r_axis]:
        return "rank", f"rank {have[r_axis]} in the file where adapter_config.json's r is {want[r_axis]}"
    return "base", f"{key}: {have}, this base's is {want}"


def from_peft(src: str, expected: dict) -> dict:
    """PEFT adapter tensors -> our flat adapters, checked against `expected` (flat path -> shape of the model's
    adapters, from adapter_config.json's rank and targets): every tensor of one and only one kind. A mismatch is
    one line that says which: the targets, the rank, or the base (the first tensors of another shape named)."""
    out, unexpected, other_shape = {}, [], set()
    ranks, bases = set(), []
    config_targets = {p.rsplit("/", 2)[-2] for p in expected}
    file_targets = set()
    for key, array, _ in iter_tensors(adapter_file(src)):
        m = _TORCH.fullmatch(key)
        target = TORCH_TARGETS.get(m.group(3) + "_proj") if m else None
        if target:
            file_targets.add(target)
        path = our_path(int(m.group(1)), target, m.group(4).lower()) if target else None
        if path is None or path not in expected:
            unexpected.append(key)
            continue
        tr = _transform(target, m.group(4).lower())
        want = tr.torch_shape(tuple(expected[path]))
        if tuple(array.shape) != tuple(want):
            kind, what = _shape_problem(key, tuple(array.shape), tuple(want), m.group(4).lower())
            (ranks.add if kind == "rank" else bases.append)(what)
            other_shape.add(path)
            continue
        out[path] = tr.to_ours(np.asarray(array, np.float32), tuple(expected[path]))
    missing = sorted(set(expected) - set(out) - other_shape)
    problems = []
    if file_targets != config_targets:
        problems.append(f"adapter_config.json targets {_module_names(config_targets)} but the tensors adapt "
                        f"{_module_names(file_targets)}")
    if bases:
        problems.append(f"{len(bases)} adapter(s) for a different base (other layer sizes): " + "; ".join(bases[:3]))
    if ranks:
        problems.append("; ".join(sorted(ranks)))
    if unexpected and file_targets == config_targets:
        problems.append(f"{len(unexpected)} tensor(s) the model has no adapter for (another layer count, or not an "
                        f"LLM linear layer): {unexpected[:4]}")
    if missing and file_targets == config_targets:
        problems.append(f"{len(missing)} adapter(s) of the model not in the file: {missing[:4]}")
    if problems:
        raise ValueError(f"{adapter_file(src)} does not fit the model: " + " | ".join(problems))
    return out


def _module_names(targets) -> list[str]:
    return [MODULES[t].rsplit(".", 1)[1] for t in TARGETS if t in targets]


def read_non_lora_trainables(src: str, projector_type: str, expected: dict) -> dict | None:
    """The originals' `non_lora_trainables.bin` (the projector trained beside the adapters) -> our flat projector
    tensors; None when the file is absent."""
    from uhd_jax.convert.importer import _resolve

    path = os.path.join(src, "non_lora_trainables.bin")
    if not os.path.exists(path):
        return None
    layout = tables.LAYOUTS["mm_projector"]
    out, unknown = {}, []
    for key, array, _ in iter_tensors(path):
        # the originals' loader strips 'base_model.' then 'model.' (model.model.mm_projector -> model.mm_projector)
        name = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
        ours, rule = _resolve(name, layout, projector_type)
        if ours is None or ours not in expected:
            unknown.append(key)
            continue
        want = rule.transform.torch_shape(tuple(expected[ours]))
        if tuple(array.shape) != tuple(want):
            raise ValueError(f"{path}: {key} is {tuple(array.shape)}, the model's projector wants {tuple(want)}")
        out[ours] = rule.transform.to_ours(np.asarray(array, np.float32), tuple(expected[ours]))
    if unknown:
        raise ValueError(f"{path}: tensors that are not this model's projector: {unknown[:5]}")
    return out


def _load_unscanned(checkpoint: str, meta: dict) -> dict:
    """Flat numpy params in their stored dtypes, layers unstacked."""
    import jax

    from uhd_jax.train.checkpoints import load_params
    from uhd_jax.train.param_tree import flatten, match_layer_layout

    flat = {k: np.asarray(v) for k, v in flatten(jax.device_get(load_params(checkpoint))).items()}
    return match_layer_layout(flat, scanned=bool(meta["model"].get("scan_layers")), want_scanned=False)


def import_lora(src: str, base: str, *, merge: bool = False, base_projector: bool = False):
    """A PEFT / original LLaVA LoRA directory on top of the uhd-jax checkpoint `base` -> (params, meta, notes).
    Unmerged, the checkpoint's model gains `llm.lora` (adapters applied on the fly); `merge` folds them into the
    kernels as the originals' merge_lora_weights.py does. The projector comes from `non_lora_trainables.bin`; without
    that file the import stops unless `base_projector` accepts `base`'s projector, or the adapter names llava-hf's
    modules (PEFT on LlavaForConditionalGeneration: the projector is the base's)."""
    from uhd_jax.convert.importer import expected_params
    from uhd_jax.models.lora import lora_config, merge_adapters
    from uhd_jax.train.checkpoints import load_meta
    from uhd_jax.train.param_tree import flatten, match_layer_layout, unflatten

    lora = read_adapter_config(src)
    meta = load_meta(base)
    model = dict(meta["model"])
    if model["llm"].get("lora"):
        raise ValueError(f"{base} already has LoRA adapters (model.llm.lora); start from a checkpoint without them")
    with_lora = dict(model, llm=dict(model["llm"], lora=lora))
    expected = {k: v.shape for k, v in expected_params(with_lora, ["llm"]).items()
                if k.rsplit("/", 1)[1] in ("lora_a", "lora_b")}
    adapters = from_peft(src, expected)
    flat = _load_unscanned(base, meta)
    notes = [f"{len(adapters)} adapter tensors (rank {lora['rank']}, alpha {lora['alpha']:g}, "
             f"{', '.join(lora['targets'])}) from {adapter_file(src)}"]
    proj_expected = {k: v.shape for k, v in flat.items() if k.startswith("projector/")}
    if proj_expected:
        projector = read_non_lora_trainables(src, model.get("projector_type", "mlp2x_gelu"), proj_expected)
        # a PEFT adapter of llava-hf's LlavaForConditionalGeneration keeps the projector in the base model
        hf_named = any(".language_model.layers." in k for k in list_keys(adapter_file(src)))
        if projector is None and not base_projector and not hf_named:
            raise ValueError(f"{src} has no non_lora_trainables.bin, the projector the originals train beside the "
                             f"adapters (their LoRA scripts save it there): the {len(adapters)} adapter tensors would "
                             f"load, but onto {base}'s projector. Put the file there, or pass --base-projector to "
                             f"keep {base}'s projector")
        if projector is None:
            notes.append(f"no non_lora_trainables.bin: the projector is {base}'s"
                         + (" (a llava-hf PEFT adapter: its projector is the base model's)" if hf_named else ""))
        else:
            left = sorted(set(proj_expected) - set(projector))
            notes.append(f"{len(projector)} projector tensors from non_lora_trainables.bin"
                         + (f"; {len(left)} kept from {base}: {left[:3]}" if left else ""))
            flat.update({k: v.astype(flat[k].dtype) for k, v in projector.items()})
    flat.update(adapters)
    if merge:
        flat = flatten(merge_adapters(unflatten(flat), lora_config(lora).scaling))
        notes.append("adapters merged into the base kernels (W + alpha / r * A.B)")
    else:
        model = with_lora
    flat = match_layer_layout(flat, scanned=False, want_scanned=bool(model.get("scan_layers")))
    record = {k: v for k, v in meta.items() if k != "conversion"}
    record.update(model=model, lora_source=os.path.abspath(src), lora_merged=merge)
    return unflatten(flat), record, notes


def export_lora(checkpoint: str, fmt: str, out: str, dtype: str = "float32") -> list[str]:
    """The checkpoint's adapters as a PEFT directory for a base exported as `fmt` (`uhd-convert export --adapters
    drop`); for llava_original also the projector as `non_lora_trainables.bin`, as the originals save it."""
    from uhd_jax.convert.exporter import load_flat, torch_state
    from uhd_jax.convert.torch_io import save_torch_bin
    from uhd_jax.train.checkpoints import load_meta

    meta = load_meta(checkpoint)
    lora = meta["model"]["llm"].get("lora")
    if not lora:
        raise ValueError(f"{checkpoint} has no LoRA adapters (its model.llm.lora is unset)")
    flat = load_flat(checkpoint, meta)
    files = write_adapter(flat, lora, fmt, out, dtype)
    if fmt == "llava_original" and any(k.startswith("projector/") for k in flat):
        state = torch_state(flat, tables.LAYOUTS["mm_projector"], ["projector"],
                            meta["model"].get("projector_type", "mlp2x_gelu"))
        save_torch_bin(os.path.join(out, "non_lora_trainables.bin"),
                       {"base_model.model." + k: v for k, v in state}, dtype)
        files.append("non_lora_trainables.bin")
    return files
