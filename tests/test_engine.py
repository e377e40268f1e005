"""The in-flight batching engine (uhd_jax/serve/engine.py): concurrent greedy answers are the offline answers token for
token, a seeded sampled answer does not depend on its batch mates, requests join a running batch, the programs are
one step, one row copy and one prefill per bucket, and streamed deltas add up to the answer."""

import pytest

from tests.serve_helpers import eval_images, shared_checkpoint
from uhd_jax.cli_errors import UserError

Q = "What does the sign say?"
TOKENS = 16


@pytest.fixture(scope="module")
def setup(synthetic_data, tmp_path_factory):
    import uhd_jax
    from uhd_jax.serve.engine import Engine, compiled_programs

    final = shared_checkpoint("configs/llava15.py:tiny", "llava15", synthetic_data, tmp_path_factory)
    model = uhd_jax.load(final, batch_size=1)
    images = eval_images(synthetic_data, 2)
    before = compiled_programs()
    engine = Engine(model, slots=4, max_tokens_limit=TOKENS, max_prompt_tokens=256)
    yield model, engine, images, before, final
    engine.close()


def user(text):
    return [{"role": "user", "content": text}]


def offline_tokens(model, image, question):
    """The offline generator's token ids for one question (up to EOS)."""
    conv = model.conversation([], question, image is not None)
    prompt = model._prompt(conv, image, "prompt")
    return [int(t) for t in model.generator(max_new_tokens=TOKENS).token_ids([prompt], seeds=[0])[0]]


def test_concurrent_requests_answer_as_offline_and_compile_once_per_bucket(setup):
    from uhd_jax.serve.engine import compiled_programs

    model, engine, images, before, _ = setup
    # the long text prompt lands in a longer bucket than the image prompts
    cases = [(images[0], Q), (images[1], "What colour is the text?"), (None, "Say something about " + "the sign " * 30)]
    offline = model.generate([im for im, _ in cases], [q for _, q in cases], max_new_tokens=TOKENS)
    steps = engine.steps
    # six requests for four slots: the last two join while the first four are decoding
    greedy = [engine.submit(user(q), im, max_tokens=TOKENS) for im, q in cases]
    sampled = [engine.submit(user(q), im, max_tokens=TOKENS, temperature=t, top_p=p, seed=s)
               for (im, q), t, p, s in zip(cases, (0.7, 1.3, 0.9), (1.0, 0.8, 0.5), (1, 2, 3))]
    results = [h.result(timeout=120) for h in greedy + sampled]
    assert [r["text"] for r in results[:3]] == offline
    for handle, (im, q) in zip(greedy, cases):
        assert handle._request.text.tokens == offline_tokens(model, im, q)
    assert all(r["finish_reason"] in ("stop", "length") and 0 < r["completion_tokens"] <= TOKENS for r in results)
    # one at a time this takes 6 * (TOKENS - 1) steps; batched, two waves at most
    assert engine.steps - steps <= 2 * (TOKENS - 1) + 2
    programs = compiled_programs()
    # a lone request's prefill and a group's: at most two programs per bucket, two row copies
    assert programs["step"] - before["step"] <= 1 and programs["insert"] - before["insert"] <= 2
    assert programs["prefill"] - before["prefill"] <= 2 * len(engine.buckets) and len(engine.buckets) == 2
    # another mix of settings, seeds and stop strings in the same buckets compiles nothing
    again = [engine.submit(user(q), im, max_tokens=TOKENS - 3, temperature=0.5, seed=9, stop=["zz"])
             for im, q in cases]
    assert all(h.result(timeout=120)["completion_tokens"] <= TOKENS - 3 for h in again)
    assert compiled_programs() == programs


def test_a_seeded_sample_does_not_depend_on_its_batch_mates(setup):
    model, engine, images, _, _ = setup
    ask = dict(max_tokens=TOKENS, temperature=1.5, top_p=0.9, seed=11)
    alone = engine.submit(user(Q), images[0], **ask)
    alone_text = alone.result(timeout=120)["text"]
    mates = [engine.submit(user("Say something."), None, max_tokens=TOKENS, temperature=1.5, seed=s) for s in (4, 5)]
    crowded = engine.submit(user(Q), images[0], **ask)
    assert crowded.result(timeout=120)["text"] == alone_text
    assert crowded._request.text.tokens == alone._request.text.tokens
    other_seed = engine.submit(user(Q), images[0], **dict(ask, seed=12))
    other_seed.result(timeout=120)
    assert other_seed._request.text.tokens != alone._request.text.tokens
    assert all(m.result(timeout=120)["completion_tokens"] > 0 for m in mates)


def test_streaming_stop_strings_cancel_and_chat(setup):
    model, engine, images, _, _ = setup
    (answer,) = model.generate([images[0]], [Q], max_new_tokens=TOKENS)
    handle = engine.submit(user(Q), images[0], max_tokens=TOKENS)
    deltas = list(handle)
    assert "".join(deltas) == handle.result()["text"] == answer and len(deltas) > 1
    # a stop string from the middle of the answer cuts it there (what the offline generator returns)
    stop = answer[len(answer) // 2:len(answer) // 2 + 2]
    cut = answer[:answer.index(stop)].strip()
    handle = engine.submit(user(Q), images[0], max_tokens=TOKENS, stop=[stop, "never"])
    deltas = list(handle)
    assert (handle.result()["text"], handle.result()["finish_reason"]) == (cut, "stop")
    assert "".join(deltas) == cut
    # a cancelled request ends at once and frees its slot
    handle = engine.submit(user(Q), images[0], max_tokens=TOKENS)
    handle.cancel()
    assert handle.result(timeout=60)["finish_reason"] == "cancelled"
    # a chat streams its turns and keeps them: the second answer is the API's two-turn answer
    chat = model.new_chat(images[0])
    first = "".join(engine.stream_chat(chat, "What is written?", max_tokens=TOKENS))
    second = "".join(engine.stream_chat(chat, "And the colour?", max_tokens=TOKENS))
    assert chat.turns == [("What is written?", first), ("And the colour?", second)]
    messages = user("What is written?") + [{"role": "assistant", "content": first}] + user("And the colour?")
    assert model.chat(messages, image=images[0], max_new_tokens=TOKENS) == second
    assert not any(engine._rows)


def test_over_a_mesh_the_answers_are_the_single_device_ones(setup):
    import uhd_jax
    from uhd_jax.serve.engine import Engine

    model, engine, images, _, final = setup
    cases = [(images[0], Q), (images[1], Q), (None, "Say something.")]
    one_device = [engine.submit(user(q), im, max_tokens=TOKENS) for im, q in cases]
    sharded_model = uhd_jax.load(final, batch_size=1, mesh="1,2,4")   # FSDP over 2, tensor parallel over 4
    with Engine(sharded_model, slots=4, max_tokens_limit=TOKENS, max_prompt_tokens=256) as sharded:
        assert len(sharded._cache.k.sharding.device_set) == 8
        answers = [sharded.submit(user(q), im, max_tokens=TOKENS) for im, q in cases]
        assert [h.result(timeout=300)["text"] for h in answers] == [h.result()["text"] for h in one_device]


class ByteTokenizer:
    """Token i is byte i: a character of several bytes is spread over several tokens."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_deltas_never_split_a_character_and_hold_back_stops_and_spaces():
    from uhd_jax.serve.engine import Text

    words = " Ünïcödé 漢字 and  spaces ENDING after "
    text = Text(ByteTokenizer(), ())
    deltas = [text.push(b)[0] for b in words.encode()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + text.final()[1] == text.final()[0] == words.strip()
    # 'END' is held back while it could still be the stop string 'ENDS', then released; 'after' stops
    text = Text(ByteTokenizer(), ("ENDS", "ter"))
    shown = {}
    for b in words.encode():
        delta, stopped = text.push(b)
        shown[len(shown)] = shown.get(len(shown) - 1, "") + delta
        if stopped:
            break
    upto = {part: len((words[:words.index(part)] + part).encode()) - 1 for part in ("END", "ENDI", "af")}
    assert shown[upto["END"]] == "Ünïcödé 漢字 and  spaces"
    assert shown[upto["ENDI"]] == "Ünïcödé 漢字 and  spaces ENDI"
    assert stopped and shown[max(shown)] == text.final()[0] == "Ünïcödé 漢字 and  spaces ENDING af"


def test_request_mistakes_are_user_errors(setup):
    model, engine, images, _, _ = setup
    mistakes = [
        (dict(messages=[{"role": "assistant", "content": "hi"}]), "alternate user/assistant"),
        (dict(messages=[{"role": "user", "content": ["a"]}]), "content must be a string"),
        (dict(max_tokens=TOKENS + 1), "over this server's limit of 16"),
        (dict(max_tokens=0), "positive integer"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(seed=-1), "seed"),
        (dict(stop=["a", "b", "c", "d", "e"]), "at most 4"),
        (dict(messages=user("word " * 300)), "over this server's limit of 256"),
        (dict(image="/nonexistent.png"), "not found"),
    ]
    for change, message in mistakes:
        args = dict(messages=user(Q), image=None) | change
        with pytest.raises(UserError, match=message):
            engine.submit(args.pop("messages"), args.pop("image"), **args)
