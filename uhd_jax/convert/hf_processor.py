"""What an exported directory needs besides weights and config.json to be used as the originals are: the tokenizer
(with llava-hf's `<image>` and `<pad>` for `llava_hf`), the processor and image-processor configs, the chat template.

The tokenizer is the checkpoint's: `--tokenizer DIR`, else the one its config.json records (a trained stage's
`final/` records the tokenizer it trained with, `import` the --src directory when that holds tokenizer files), found
as generation finds it. The prompt format and image handling are the family's final training stage
(`configs/<family>.py`), as generation and evaluation use them.
"""
from __future__ import annotations

import json
import os
import shutil

IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"
# Files a transformers tokenizer directory may hold (sentencepiece, tokenizers, GPT-2-style BPE).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def has_tokenizer(directory: str) -> bool:
    return os.path.isdir(directory) and any(os.path.isfile(os.path.join(directory, f)) for f in _VOCAB_FILES)


def find_tokenizer(checkpoint: str, meta: dict, given: str | None) -> tuple[str | None, str]:
    """(tokenizer directory or None, why none was found)."""
    from uhd_jax.eval.checkpoint_config import _recorded_candidates

    if given:
        if not has_tokenizer(given):
            state = (f"holds no tokenizer files ({', '.join(_VOCAB_FILES)})" if os.path.isdir(given) else
                     "is not a directory")
            raise ValueError(f"--tokenizer {given} {state}; give the tokenizer directory the model was trained with")
        return os.path.abspath(given), ""
    recorded = meta.get("tokenizer")
    if not recorded:
        return None, f"{checkpoint}/config.json records no tokenizer"
    found = next((c for c in _recorded_candidates(recorded, checkpoint) if has_tokenizer(c)), None)
    if found is None:
        return None, (f"{checkpoint}/config.json records tokenizer {recorded!r}, which is not a tokenizer directory "
                      f"here (looked in {os.getcwd()} and the checkpoint's parent folders)")
    return os.path.abspath(found), ""


def load_tokenizer(path: str, **kwargs):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"cannot load the tokenizer in {path}: {e}") from None


def special_ids(tok) -> dict:
    """The token ids a transformers config carries, from the tokenizer that will produce them."""
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return {k: v for k, v in ids.items() if v is not None}


def copy_tokenizer(src: str, out: str) -> list[str]:
    """The tokenizer files verbatim (a sentencepiece tokenizer.model included: the originals load it with
    use_fast=False)."""
    copied = []
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(out, name))
            copied.append(name)
    return copied


def add_image_token(tok, vocab_size: int, index: int | None, where: str) -> int:
    """The id of `<image>` in `tok`; where the tokenizer has none, `<image>` and `<pad>` are appended as llava-hf's
    converter does (convert_llava_weights_to_hf: image = old size, pad = +1). `index`: the id recorded at import or
    given with --image-token-index, which the tokenizer must agree with."""
    from tokenizers import AddedToken

    if len(tok) > vocab_size:
        raise ValueError(f"tokenizer {where} has {len(tok)} tokens but the model's vocabulary is {vocab_size}: it is "
                         f"not the tokenizer this model was trained with; pass --tokenizer with that one")
    have = tok.get_vocab().get(IMAGE_TOKEN)
    if index is None:
        index = len(tok) if have is None else have
    if index < len(tok):
        if tok.convert_ids_to_tokens(index) != IMAGE_TOKEN:
            raise ValueError(f"image token index {index} is {tok.convert_ids_to_tokens(index)!r} in tokenizer "
                             f"{where}, not {IMAGE_TOKEN!r}" + (f" (which is {have})" if have is not None else ""))
        return index
    if index != len(tok) or have is not None:
        raise ValueError(f"image token index {index}: tokenizer {where} has {len(tok)} tokens"
                         + (f" and {IMAGE_TOKEN} at {have}" if have is not None else
                            f", so an added {IMAGE_TOKEN} is {len(tok)}"))
    tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if PAD_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    return index


def chat_template(template_name: str | None) -> str | None:
    """A Jinja chat template that renders what our `Template` renders (`uhd_jax.data.templates`): the 'two'-style
    ones (vicuna_v1, llava_v1) with the images of a turn in front, each followed by a newline (the original's
    preprocess_multimodal). None for other styles."""
    from uhd_jax.data.templates import TEMPLATES

    t = TEMPLATES.get(template_name or "")
    if t is None or t.style != "two" or not t.image_first:
        return None
    q = json.dumps
    return (
        "{%- set ns = namespace(system=" + q(t.system) + ") -%}"
        "{%- for message in messages if message['role'] == 'system' -%}"
        "{%- set ns.system = message['content'] if message['content'] is string else message['content'] | "
        "selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
        "{%- endfor -%}"
        "{{- ns.system + " + q(t.sep) + " -}}"
        "{%- for message in messages if message['role'] != 'system' -%}"
        "{%- if message['content'] is string -%}"
        "{%- set images = 0 -%}{%- set text = message['content'] -%}"
        "{%- else -%}"
        "{%- set images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}"
        "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | "
        "join(' ') -%}"
        "{%- endif -%}"
        "{%- set images = images + text.count('<image>') -%}"
        "{%- if images > 0 -%}{%- set text = '<image>\\n' * images + text.replace('<image>', '').strip() -%}"
        "{%- endif -%}"
        "{%- if message['role'] == 'user' -%}{{- " + q(t.roles[0] + ": ") + " + text + " + q(t.sep) + " -}}"
        "{%- else -%}{{- " + q(t.roles[1] + ": ") + " + text + " + q(t.sep2) + " -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- " + q(t.roles[1] + ":") + " -}}{%- endif -%}")


def image_processor(vision: dict, pad: bool):
    """LLaVA-1.5's image path (`uhd_jax.data.image_processing.llava15_image`): padded to a square with the mean
    colour where the recipe pads (LlavaImageProcessor's do_pad; a CLIPImageProcessor would centre-crop a wide image
    the model was trained to see whole), shortest edge to the tower's size (PIL bicubic), centre crop, CLIP mean/std."""
    import transformers
    from transformers.image_utils import PILImageResampling

    from uhd_jax.data.image_processing import CLIP_MEAN, CLIP_STD

    cls = getattr(transformers, "LlavaImageProcessorPil", None) or transformers.LlavaImageProcessor
    size = vision["image_size"]
    return cls(do_pad=pad, do_resize=True, size={"shortest_edge": size}, resample=PILImageResampling.BICUBIC,
               do_center_crop=True, crop_size={"height": size, "width": size}, do_rescale=True,
               rescale_factor=1 / 255, do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
               do_convert_rgb=True)


def write_llava_processor(out: str, tok, vision: dict, recipe: dict) -> None:
    """LlavaProcessor (tokenizer, image processor, chat template) as `AutoProcessor.from_pretrained(out)` loads it."""
    from transformers import LlavaProcessor

    from uhd_jax.convert.hf_configs import feature_select_strategy

    images = image_processor(vision, recipe.get("image_aspect_ratio") == "pad")
    processor = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=vision["patch_size"],
                               vision_feature_select_strategy=feature_select_strategy(vision),
                               chat_template=chat_template(recipe.get("template")), image_token=IMAGE_TOKEN,
                               num_additional_image_tokens=1)   # CLIP's CLS
    processor.save_pretrained(out)
    images.save_pretrained(out)   # transformers 5 nests it in processor_config.json, 4 reads preprocessor_config.json
    path = os.path.join(out, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    # transformers 5 names its generic fast tokenizer TokenizersBackend, which transformers 4 does not know; both
    # read PreTrainedTokenizerFast (the class a tokenizer.json-only directory had before)
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)


def image_split_note(tok, template_name: str | None, image_id: int, n_tokens: int) -> str | None:
    """Our prompts are tokenized chunk-wise around `<image>` (the original's tokenizer_image_token); transformers
    tokenizes the whole text with `<image>` as an added token. For Llama/Vicuna (a '▁' prepended to every split) and
    byte-level BPE (Llama-3, Qwen2) both give the same ids; a tokenizer that prepends '▁' only at the start of the
    text does not. A note naming the first difference on a probe prompt, or None."""
    from uhd_jax.data.templates import TEMPLATES
    from uhd_jax.data.tokenize import IMAGE_PLACEHOLDER, tokenize_segments

    t = TEMPLATES.get(template_name or "vicuna_v1") or TEMPLATES["vicuna_v1"]
    segments = t.segments([{"from": "human", "value": "<image>\nWhat is written on the sign?"}],
                          add_generation_prompt=True)
    ours = []
    for i in tokenize_segments(tok, segments).ids.tolist():
        ours += [image_id] * n_tokens if i == IMAGE_PLACEHOLDER else [i]
    text = "".join(s for s, _ in segments).replace(IMAGE_TOKEN, IMAGE_TOKEN * n_tokens)
    theirs = tok(text)["input_ids"]
    if ours == theirs:
        return None
    at = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return (f"the exported tokenizer splits a prompt differently from uhd-jax's chunk-wise tokenization from token "
            f"{at} on ({tok.convert_ids_to_tokens(theirs[at:at + 3])} where training had "
            f"{tok.convert_ids_to_tokens(ours[at:at + 3])}), so transformers' answers will not be the model's")
