"""Conversation templates: exact prompt strings from the spec and the learned spans of every template."""
import pytest

from uhd_jax.data.templates import (LLAVAR_SYSTEM, TemplateError, TEMPLATES, get_template, move_image_first)

VICUNA_EVAL = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
               "detailed, and polite answers to the user's questions. USER: <image>\nWhat is it?\nAnswer the question "
               "using a single word or phrase. ASSISTANT:")


def conv(*turns):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]


def learned(t, messages):
    return [text for text, is_learned in t.segments(messages) if is_learned]


def test_vicuna_v1_eval_prompt_is_the_spec_string():
    msgs = conv("<image>\nWhat is it?\nAnswer the question using a single word or phrase.")
    assert get_template("vicuna_v1").prompt(msgs, add_generation_prompt=True) == VICUNA_EVAL
    assert get_template("v1") is get_template("vicuna_v1")


def test_image_moves_to_the_front_of_its_turn():
    assert move_image_first("What is this? <image>") == "<image>\nWhat is this?"
    assert move_image_first("no image") == "no image"
    t = get_template("vicuna_v1")
    assert t.prompt(conv("Look <image> here", "ok")).endswith("USER: <image>\nLook  here ASSISTANT: ok</s>")


def test_two_style_multi_turn_strings_and_learned_spans():
    t = get_template("llava_v1")
    msgs = conv("<image>\nQ1", "A1", "Q2", "A2")
    assert t.prompt(msgs) == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 "
        "ASSISTANT: A2</s>")
    assert learned(t, msgs) == [" A1</s>", " A2</s>"]


def test_llavar_keeps_image_in_place_and_its_system_prompt():
    t = get_template("llavar_v1")
    assert "Lab.You are able" in LLAVAR_SYSTEM and "language.Follow" in LLAVAR_SYSTEM
    msgs = conv("What is written? <image>", "EXIT")
    assert t.prompt(msgs) == LLAVAR_SYSTEM + " USER: What is written? <image> ASSISTANT: EXIT</s>"


def test_plain_is_image_then_caption_and_newline():
    t = get_template("plain")
    msgs = conv("<image>\nDescribe the image briefly.", "a red sign")
    assert t.segments(msgs) == [("<image>", False), ("a red sign\n", True)]
    for bad in (conv("no image", "x"), conv("<image>", "x", "y", "z"), conv("<image>")):
        with pytest.raises(TemplateError, match="plain"):
            t.segments(bad)
    # Training drops the human text whatever it says (preprocess_plain): the question never reaches the labels.
    assert t.segments(conv("<image>\nWhat is written?", "EXIT")) == [("<image>", False), ("EXIT\n", True)]
    # A stage-1 model with no question is prompted with the image alone; its caption is the continuation.
    assert t.segments(conv("<image>"), add_generation_prompt=True) == [("<image>", False)]
    assert t.segments(conv("<image>\n"), add_generation_prompt=True) == [("<image>", False)]
    with pytest.raises(TemplateError, match="plain"):
        t.segments(conv("Describe."), add_generation_prompt=True)


def test_plain_inference_prompt_keeps_the_question_like_conv_llava_plain():
    """model_vqa with conv_llava_plain: qs = '<image>\\n' + question, appended with the assistant's None; PLAIN's
    get_prompt writes system '' + qs + sep '\\n' and nothing for None."""
    t = get_template("plain")
    assert t.prompt(conv("<image>\nWhat is the total?"), add_generation_prompt=True) == "<image>\nWhat is the total?\n"
    assert t.segments(conv("<image>\nDescribe."), add_generation_prompt=True) == [("<image>\nDescribe.\n", False)]
    # a question placed before the image (a benchmark rule's image_after_question) is kept where it is, as qs is
    assert t.prompt(conv("What is the total?\n<image>"), add_generation_prompt=True) == "What is the total?\n<image>\n"


def test_llama3_strings_and_spans():
    t = get_template("llama3")
    msgs = conv("<image>\nHi", "Hello", "More?", "Yes")
    assert t.prompt(msgs, add_generation_prompt=False) == (
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nMore?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nYes<|eot_id|>")
    assert learned(t, msgs) == ["Hello<|eot_id|>", "Yes<|eot_id|>"]
    assert t.prompt(conv("Hi"), add_generation_prompt=True).endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_qwen_chatml_strings_and_spans():
    t = get_template("qwen_1_5")
    msgs = conv("<image>\nHi", "Hello")
    assert t.prompt(msgs) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                              "<image>\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n")
    assert learned(t, msgs) == ["Hello<|im_end|>"]
    assert t.prompt(conv("Hi"), add_generation_prompt=True).endswith("<|im_start|>assistant\n")


def test_text_only_conversation_has_no_image():
    t = get_template("vicuna_v1")
    assert "<image>" not in t.prompt(conv("Hello", "Hi"))


@pytest.mark.parametrize("bad,match", [
    ([], "empty"), ([{"from": "gpt", "value": "x"}], "alternate"), ([{"from": "bot", "value": "x"}], "'bot'")])
def test_malformed_conversations_are_named(bad, match):
    with pytest.raises(TemplateError, match=match):
        TEMPLATES["vicuna_v1"].segments(bad)
