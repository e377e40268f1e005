"""Convert checkpoints between PyTorch layouts and uhd-jax.

  uhd-convert import --src DIR [--vision DIR] [--projector mm_projector.bin]
                                       [--config configs/llava15.py:7b] --out CKPT
  uhd-convert export --checkpoint CKPT --format llava_hf --out DIR [--dtype bfloat16]
                                       [--tokenizer DIR]
  uhd-convert verify --checkpoint CKPT --torch DIR      # logit check against transformers
  uhd-convert import-lora --src LORA_DIR --base CKPT --out CKPT [--merge] [--base-projector]
  uhd-convert export-lora --checkpoint CKPT --format hf_llama|llava_hf|llava_original --out DIR
  uhd-convert layouts
"""
from __future__ import annotations

import argparse
import os
import sys

from uhd_jax.convert import hf_configs, hf_processor, tables
from uhd_jax.convert.exporter import FORMATS, export_checkpoint
from uhd_jax.convert.importer import Source, import_checkpoint
from uhd_jax.convert.torch_io import list_keys, read_config


PROG = "uhd-convert"


def load_experiment(spec: str):
    from uhd_jax.cli_errors import load_config   # a missing file, no get_config, an unknown variant: one line

    try:
        return load_config(spec)
    except (ImportError, SyntaxError, TypeError) as e:   # a config file that does not even import
        raise ValueError(f"--config {spec}: {type(e).__name__}: {e}") from None


def model_for_sources(sources: list[Source], config_spec: str | None) -> tuple[dict, dict, str | None]:
    """(config.model dict, HF metadata, family) from --config, else from the sources' config.json files.
    Resolves the main source's layout in place (its keys are read once). With --config, the metadata also holds the
    config's `variant` (generation reads the variant a checkpoint records instead of matching sizes)."""
    main = sources[0]
    keys = list_keys(main.path)
    main.layout = main.layout or tables.detect_layout(keys)
    layout = main.layout
    cfg = read_config(main.path) or {}
    has_vision = any(s.layout == "hf_clip" for s in sources[1:]) or any(k.startswith("model.vision_tower.")
                                                                          for k in keys)
    if layout == "llava_original" and not has_vision:
        named = f" (its config.json names mm_vision_tower={cfg['mm_vision_tower']!r})" if cfg.get(
            "mm_vision_tower") else ""
        raise ValueError(f"{main.path} holds no vision tower (no model.vision_tower.* tensors: the original trainings "
                         f"save without it): pass --vision with the CLIP checkpoint directory{named}")
    meta = hf_configs.hf_meta(cfg) if cfg else {}
    if config_spec:
        exp = load_experiment(config_spec)
        variant = exp.get("variant") or config_spec.partition(":")[2]
        return exp.model.to_dict(), dict(meta, variant=variant) if variant else meta, exp.get("family")
    if not cfg:
        raise ValueError(f"{main.path} has no config.json beside it; pass --config (e.g. configs/llava15.py:7b)")
    vision_cfg = None
    vision_src = next((s for s in sources[1:] if (s.layout or tables.detect_layout(list_keys(s.path))) == "hf_clip"),
                      None)
    if vision_src is not None:
        vision_cfg = read_config(vision_src.path)
        if vision_cfg is None:
            raise ValueError(f"--vision {vision_src.path} has no config.json (the CLIP sizes come from it)")
    original = layout == "llava_original" or (layout == "mm_projector" and "mm_hidden_size" in cfg)
    if not original and layout not in ("llava_hf", "hf_llama", "hf_clip"):
        raise ValueError(f"layout {layout}: pass --config to say which model this belongs to")
    try:
        if layout == "llava_hf":
            model, family = hf_configs.model_from_llava_hf(cfg), "llava15"
        elif original:
            model, family = hf_configs.model_from_llava_original(cfg, vision_cfg)
        elif layout == "hf_llama":
            model, family = {"llm": hf_configs.llm_from_hf(cfg)}, None
            if vision_cfg is not None:
                model["vision"] = hf_configs.vision_from_hf(vision_cfg)
        else:
            model, family = {"vision": hf_configs.vision_from_hf(cfg)}, None
    except KeyError as e:
        raise ValueError(f"config.json of {main.path} has no {e.args[0]!r}; pass --config (e.g. "
                         f"configs/uhd_v1.py:13b) to describe the model") from None
    except ValueError as e:
        raise ValueError(f"config.json of {main.path}: {e}") from None
    model.update(dtype="bfloat16", param_dtype="float32", attention_impl="auto", remat_policy="none",
                 scan_layers=False)
    return model, meta, family


def check_output_dir(path: str, flag: str = "--out"):
    """Fail before a long conversion rather than at its end: the output must be a directory we can create/write."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a file; give a directory")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"{flag} {path}: {probe} is a file, so the directory cannot be created; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {probe} is not writable; choose a directory you can write to")


def cmd_import(args) -> int:
    from uhd_jax.train.checkpoints import save_params

    check_output_dir(args.out)
    if args.tokenizer and not hf_processor.has_tokenizer(args.tokenizer):
        raise ValueError(f"--tokenizer {args.tokenizer} is not a tokenizer directory (no tokenizer.json, "
                         f"tokenizer.model or vocab.json)")
    sources = [Source(args.src, args.layout)]
    if args.vision:
        sources.append(Source(args.vision, "hf_clip"))
    for projector in args.projector or ():
        sources.append(Source(projector, "mm_projector"))
    model, meta, family = model_for_sources(sources, args.config)
    variant = meta.pop("variant", None)
    params, report = import_checkpoint(sources, model)
    record = {"model": model, "hf": meta, "family": family, "conversion": report}
    if variant:
        record["variant"] = variant
    # what generation and export look for; original LLaVA and llava-hf directories hold their tokenizer
    src_dir = args.src if os.path.isdir(args.src) else os.path.dirname(os.path.abspath(args.src))
    tokenizer = args.tokenizer or (src_dir if hf_processor.has_tokenizer(src_dir) else None)
    if tokenizer:
        record["tokenizer"] = os.path.abspath(tokenizer)
    save_params(args.out, params, record)
    print(f"imported {report['tensors']} tensors ({', '.join(report['components'])}) from "
          f"{', '.join(f'{s} [{l}]' for s, l in zip(report['sources'], report['layouts']))} -> {args.out}"
          + (f" as {family}" + (f":{variant}" if variant else "") if family else ""))
    print(f"tokenizer: {record['tokenizer']}" if "tokenizer" in record else
          f"no tokenizer recorded ({src_dir} holds none): pass --tokenizer DIR here or to export for llava_hf")
    if report["skipped"]:
        print(f"skipped {len(report['skipped'])} tensors the model does not use, e.g. {report['skipped'][:3]}")
    for line in report["overridden"]:
        print(f"note: {line}")
    return 0


def cmd_export(args) -> int:
    check_output_dir(args.out)
    done = export_checkpoint(args.checkpoint, args.format, args.out, args.dtype, args.image_token_index,
                             args.tokenizer, args.adapters)
    print(f"exported {args.checkpoint} as {args.format} ({args.dtype}) -> {args.out}: {', '.join(done.files)}")
    for line in done.notes:
        print(f"note: {line}")
    return 0


def cmd_import_lora(args) -> int:
    from uhd_jax.convert.peft import import_lora
    from uhd_jax.train.checkpoints import save_params

    check_output_dir(args.out)
    params, record, notes = import_lora(args.src, args.base, merge=args.merge, base_projector=args.base_projector)
    save_params(args.out, params, record)
    print(f"imported the LoRA of {args.src} onto {args.base} -> {args.out}" + (" (merged)" if args.merge else ""))
    for line in notes:
        print(f"note: {line}")
    return 0


def cmd_export_lora(args) -> int:
    from uhd_jax.convert.peft import export_lora

    check_output_dir(args.out)
    files = export_lora(args.checkpoint, args.format, args.out, args.dtype)
    print(f"exported the LoRA adapters of {args.checkpoint} for a {args.format} base -> {args.out}: "
          f"{', '.join(files)}")
    return 0


def cmd_verify(args) -> int:
    from uhd_jax.convert.verify import compare_logits

    err = compare_logits(args.checkpoint, args.torch)
    ok = err <= args.tolerance
    print(f"relative error {err:.3e} ({'within' if ok else 'ABOVE'} tolerance {args.tolerance:g}): "
          f"{args.checkpoint} vs {args.torch}")
    return 0 if ok else 1


def cmd_layouts(args) -> int:
    for name, layout in tables.LAYOUTS.items():
        prefixes = "; ".join(f"{c.ours}: {', '.join(c.prefixes)}" for c in layout.components)
        print(f"{name:15s} {layout.description}\n{'':15s} {prefixes}")
    print("\nexport formats: " + ", ".join(f"{k} ({v.description})" for k, v in FORMATS.items()))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with its mistakes (unknown --format, a missing --src) as one line like ours, not a usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def main(argv=None) -> int:
    parser = _Parser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("import", help="PyTorch checkpoint(s) -> uhd-jax checkpoint")
    p.add_argument("--src", required=True, help="checkpoint directory or file (safetensors / .bin, sharded or not)")
    p.add_argument("--layout", choices=sorted(tables.LAYOUTS), help="key layout of --src (default: detect)")
    p.add_argument("--vision", help="HF CLIP checkpoint for models that do not store their vision tower")
    p.add_argument("--projector", action="append",
                   help="a stage-1 mm_projector.bin to add or replace the projector (repeat for SliME's sampler.bin)")
    p.add_argument("--config", help="experiment config FILE[:variant] describing the model (default: config.json)")
    p.add_argument("--tokenizer", help="the model's tokenizer directory, recorded in the checkpoint (default: --src "
                                       "when it holds one)")
    p.add_argument("--out", required=True, help="output uhd-jax checkpoint directory")
    p.set_defaults(fn=cmd_import)
    p = sub.add_parser("export", help="uhd-jax checkpoint -> PyTorch layout")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--format", required=True, choices=sorted(FORMATS))
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--image-token-index", type=int,
                   help="llava_hf: id of the <image> token in the vocabulary (default: the tokenizer's <image>, else "
                        "<image> and <pad> are appended as llava-hf does)")
    p.add_argument("--tokenizer", help="the model's tokenizer directory (default: the one the checkpoint records); "
                                       "llava_hf needs one, hf_llama and llava_original copy it")
    p.add_argument("--adapters", choices=("merge", "drop"), default="merge",
                   help="a LoRA checkpoint: merge the adapters into the weights (default) or leave them out (the base "
                        "for export-lora's PEFT adapter); a QLoRA checkpoint's base is dequantised either way")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("import-lora", help="PEFT / original LLaVA LoRA directory + uhd-jax base -> uhd-jax checkpoint")
    p.add_argument("--src", required=True, help="adapter_config.json, adapter_model.safetensors|.bin and the "
                                                "originals' non_lora_trainables.bin (the projector)")
    p.add_argument("--base", required=True, help="uhd-jax checkpoint of the base model (uhd-convert import)")
    p.add_argument("--out", required=True)
    p.add_argument("--merge", action="store_true", help="fold the adapters into the weights (merge_lora_weights.py)")
    p.add_argument("--base-projector", action="store_true",
                   help="accept a directory without non_lora_trainables.bin: keep the base's projector")
    p.set_defaults(fn=cmd_import_lora)
    p = sub.add_parser("export-lora", help="uhd-jax LoRA checkpoint -> PEFT adapter directory")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--format", required=True, choices=("hf_llama", "llava_hf", "llava_original"),
                   help="the base the adapter goes on (export it with `export --adapters drop`)")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.set_defaults(fn=cmd_export_lora)
    p = sub.add_parser("verify", help="compare our logits with the transformers model in a directory (fp32, CPU)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--torch", required=True, help="llava_hf, hf_llama or hf_clip directory")
    p.add_argument("--tolerance", type=float, default=1e-5)
    p.set_defaults(fn=cmd_verify)
    p = sub.add_parser("layouts", help="list the supported key layouts and export formats")
    p.set_defaults(fn=cmd_layouts)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, OSError) as e:   # bad input (CheckpointMismatchError is one); OSError: a path we cannot use
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
