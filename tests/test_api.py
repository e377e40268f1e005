"""The Python API (`uhd_jax.load`): a checkpoint alone loads; `generate` gives the tokens of `uhd-generate --image
--prompt`; a second call in the same bucket compiles nothing; a chat's second prompt is the template's two turns."""

import time

import pytest
from PIL import Image

from tests.serve_helpers import eval_images, shared_checkpoint
from uhd_jax.data.templates import VICUNA_SYSTEM
from uhd_jax.eval.generate import generate_tokens

QUESTION = "What does the sign say?"


@pytest.fixture(scope="module")
def checkpoint(synthetic_data, tmp_path_factory):
    """A randomly initialised tiny LLaVA-1.5 laid out as training leaves it (WORK/runs/tiny/sft/final recording its
    family and its tokenizer relative to WORK), and the model loaded from it."""
    import uhd_jax

    final = shared_checkpoint("configs/llava15.py:tiny", "llava15", synthetic_data, tmp_path_factory)
    return final, uhd_jax.load(final, batch_size=2), eval_images(synthetic_data, 2)


def test_generate_equals_the_offline_cli_and_reuses_compiled_programs(checkpoint, capsys):
    from uhd_jax.cli import generate

    final, model, images = checkpoint
    assert generate.main(["--checkpoint", final, "--image", images[0], "--prompt", QUESTION,
                          "--max-new-tokens", "4"]) == 0
    offline = capsys.readouterr().out.rstrip("\n").split("\n")[-1].strip()
    # a path and the same picture as a PIL image give the CLI's answer
    first = model.generate([images[0], Image.open(images[0])], [QUESTION, QUESTION], max_new_tokens=4)
    assert offline and first == [offline, offline]
    programs, compilations = generate_tokens._cache_size(), model.compilations
    t0 = time.perf_counter()
    again = model.generate([images[1]], [QUESTION], max_new_tokens=4)   # another image, the same bucket
    second = time.perf_counter() - t0
    assert len(again) == 1 and isinstance(again[0], str)
    assert generate_tokens._cache_size() == programs and model.compilations == compilations == 1
    assert model.generator(max_new_tokens=4).signatures == {(2, 64)}
    assert second < 10.0, f"second call of a warm bucket took {second:.1f}s"


def test_two_turn_chat_reads_both_turns_in_the_template(checkpoint):
    from uhd_jax.eval.model_vqa import question_sample

    final, model, images = checkpoint
    chat = model.new_chat(images[0])
    first = chat.ask("What is written?", max_new_tokens=3)
    assert chat.turns == [("What is written?", first)]
    # vicuna_v1 (LLaVA-1.5's template) for these two turns, written out by hand
    expected = (f"{VICUNA_SYSTEM} USER: <image>\nWhat is written? ASSISTANT: {first}</s>"
                f"USER: And the colour? ASSISTANT:")
    assert model.prompt_text(chat.turns, "And the colour?") == expected
    second = chat.ask("And the colour?", max_new_tokens=3)
    # the same answer from the offline generator on a hand-made two-turn sample
    sample = question_sample({"question_id": 0, "image": images[0], "text": "What is written?"}, model.rule)
    sample["conversations"] = [sample["conversations"][0], {"from": "gpt", "value": first},
                               {"from": "human", "value": "And the colour?"}, {"from": "gpt", "value": ""}]
    gen = model.generator(max_new_tokens=3)
    assert gen([model.preparer.prompt(sample, turn=1)], seeds=[0]) == [second]
    # the messages form asks the same
    messages = [{"role": "user", "content": "What is written?"}, {"role": "assistant", "content": first},
                {"role": "user", "content": "And the colour?"}]
    assert model.chat(messages, image=images[0], max_new_tokens=3) == second


def test_slice_plan_counts_the_prompt_image_positions_and_text_only_prompts_answer(checkpoint):
    final, model, images = checkpoint
    plan = model.slice_plan(images[0])
    conv = model.conversation([], QUESTION, has_image=True)
    prompt = model._prompt(conv, images[0], "prompt")
    assert plan["grid"] is None and plan["tokens"] == int((prompt["image_map"] >= 0).sum()) > 0
    (text,) = model.generate([None], ["Say something."], max_new_tokens=3)
    assert isinstance(text, str)


def test_api_mistakes_are_one_line(checkpoint, tmp_path):
    from uhd_jax.cli_errors import UserError

    final, model, images = checkpoint
    with pytest.raises(UserError, match="2 images for 1 prompts"):
        model.generate(images, [QUESTION])
    with pytest.raises(UserError, match="image file not found"):
        model.generate([str(tmp_path / "none.png")], [QUESTION], max_new_tokens=4)
    with pytest.raises(UserError, match="alternate user/assistant"):
        model.chat([{"role": "assistant", "content": "hi"}])
    with pytest.raises(UserError, match="top_p"):
        model.generate([images[0]], [QUESTION], top_p=0.0)
    with pytest.raises(UserError, match="not found"):
        __import__("uhd_jax").load(str(tmp_path / "nothing"))
