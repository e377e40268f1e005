"""Conversion test inputs: tiny tokenizers with exactly the number of tokens a tiny model's vocabulary has, and
checkpoints of random parameters.

`llama_style` has the layout of the Llama-2 / Vicuna `tokenizer.json` (legacy): BPE over a normalizer that prepends
'▁' to every text split (so after an added token like `<image>` too, as the original's chunk-wise
`tokenizer_image_token` does), `<unk>`=0 `<s>`=1 `</s>`=2, BOS added in front.
"""
from __future__ import annotations

import numpy as np

from uhd_jax.data.templates import TEMPLATES

CORPUS = [t.system for t in TEMPLATES.values()] + [
    "USER: What is written on the sign? ASSISTANT: The sign says stop, 42 metres ahead.",
    "USER: Describe the picture briefly. ASSISTANT: A red receipt with prices and a bar chart of sales.",
    "What colour is the largest bar? Which page number is printed at the bottom left corner?",
] * 4


def llama_style(out_dir: str, size: int, added: tuple[str, ...] = ()) -> str:
    """Save a tokenizer of `size` tokens in all (`added` special tokens last) to `out_dir`; returns `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # A pre-tokenizer for training only, so that merges stay within words; Llama's tokenizer.json has none.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=size - len(added), special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=list("0123456789.,:?!'\n"), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if added:
        fast.add_tokens(list(added), special_tokens=True)
    assert len(fast) == size, f"the corpus gives {len(fast)} tokens, not {size}: lengthen CORPUS"
    fast.save_pretrained(out_dir)
    return out_dir


def random_checkpoint(path, spec: str, llm=None, seed=0, **meta) -> str:
    """A checkpoint of config `spec`'s model (its LLM updated by `llm`) with random parameters, as a trained stage
    saves it (`meta`: e.g. its tokenizer). Shapes come from tracing the model, so nothing is compiled."""
    from uhd_jax.convert.importer import expected_params
    from uhd_jax.config_loading import load_config
    from uhd_jax.train.checkpoints import save_params
    from uhd_jax.train.param_tree import unflatten

    c = load_config(spec)
    model = c.model.to_dict()
    model["llm"].update(llm or {})
    rng = np.random.default_rng(seed)
    # norms around 1 and every bias non-zero, so that no parameter goes unused by a comparison
    flat = {k: (rng.normal(size=s.shape) * 0.2 + k.endswith("/scale")).astype(np.float32)
            for k, s in expected_params(model, ("vision", "projector", "llm")).items()}
    save_params(str(path), unflatten(flat), {"model": model, "family": c.family, "variant": spec.partition(":")[2],
                                             **meta})
    return str(path)
