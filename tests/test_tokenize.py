"""Chunk-wise tokenization around <image> and labels from token spans (spec A.4, A.7)."""
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from uhd_jax.data.templates import get_template
from uhd_jax.data.tokenize import IMAGE_PLACEHOLDER, TokenizationMismatch, tokenize_segments


@pytest.fixture(scope="module")
def tok(synthetic_data):
    return AutoTokenizer.from_pretrained(synthetic_data["tokenizer"])


def conv(*turns):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]


def learned_text(tok, t):
    return tok.decode(t.ids[t.learned])


def test_plain_sample_is_bos_image_caption_newline(tok):
    t = tokenize_segments(tok, get_template("plain").segments(conv("<image>\nDescribe.", "a red sign")))
    assert t.ids[0] == tok.bos_token_id and t.ids[1] == IMAGE_PLACEHOLDER
    assert not t.learned[:2].any() and t.learned[2:].all()
    np.testing.assert_array_equal(t.ids[2:], tok("a red sign\n", add_special_tokens=False)["input_ids"])


def test_chunks_are_tokenized_separately_with_one_bos(tok):
    segs = get_template("vicuna_v1").segments(conv("<image>\nWhat is the total?", "42"))
    t = tokenize_segments(tok, segs)
    text = "".join(s for s, _ in segs)
    before, after = text.split("<image>")
    expect = ([tok.bos_token_id] + tok(before, add_special_tokens=False)["input_ids"] + [IMAGE_PLACEHOLDER]
              + tok(after, add_special_tokens=False)["input_ids"])
    np.testing.assert_array_equal(t.ids, expect)
    assert (t.ids == tok.bos_token_id).sum() == 1


def test_multi_turn_learns_each_answer_with_its_end_token(tok):
    t = tokenize_segments(tok, get_template("vicuna_v1").segments(conv("<image>\nQ one?", "BANK", "Q two?", "7.50")))
    assert tok.convert_ids_to_tokens(t.ids[t.learned].tolist()).count("</s>") == 2
    assert learned_text(tok, t).replace(" ", "") == "BANK</s>7.50</s>"
    # Nothing of the system prompt, the questions or the roles is learned.
    assert "USER" not in learned_text(tok, t) and "ASSISTANT" not in learned_text(tok, t)


def test_image_later_and_text_only_samples(tok):
    later = tokenize_segments(tok, get_template("llavar_v1").segments(conv("What is it? <image>", "SALE")))
    pos = int(np.flatnonzero(later.ids == IMAGE_PLACEHOLDER)[0])
    assert pos > 10 and learned_text(tok, later).replace(" ", "") == "SALE</s>"
    text = tokenize_segments(tok, get_template("vicuna_v1").segments(conv("Hello", "Hi")))
    assert IMAGE_PLACEHOLDER not in text.ids and learned_text(tok, text).replace(" ", "") == "Hi</s>"


def test_token_straddling_the_answer_boundary_is_a_mismatch():
    """A tokenizer that merges ':' + ' y' across the ASSISTANT:/answer boundary cannot be masked exactly."""
    chars = sorted(set("ASSISTANT: yes</>USER hi"))
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({": ": len(vocab), ": y": len(vocab) + 1})
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[(":", " "), (": ", "y")]))
    bpe.pre_tokenizer = pre_tokenizers.Split("\n", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe)
    segs = [("USER: hi ASSISTANT:", False), (" yes</s>", True)]
    with pytest.raises(TokenizationMismatch, match="straddles"):
        tokenize_segments(fast, segs)
