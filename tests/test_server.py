"""`uhd-serve` (uhd_jax/serve/server.py) driven by the official `openai` client: plain and streamed answers are the
offline greedy answers; every client mistake is a 4xx OpenAI error object; a client that leaves mid-stream frees its
slot; the CLI's own mistakes are one line."""

import http.client
import json
import socket
import time

import pytest

from tests.serve_helpers import data_url, eval_images, png_header, serving, shared_checkpoint, user_message

Q = "What does the sign say?"
TOKENS = 16


@pytest.fixture(scope="module")
def served(synthetic_data, tmp_path_factory):
    import uhd_jax
    from uhd_jax.serve.openai_schema import Limits

    final = shared_checkpoint("configs/llava15.py:tiny", "llava15", synthetic_data, tmp_path_factory)
    model = uhd_jax.load(final, batch_size=1)
    limits = Limits(max_image_bytes=2 ** 20, max_image_pixels=2 ** 20)
    with serving(model, limits, slots=4, max_tokens_limit=TOKENS, max_prompt_tokens=256) as server:
        yield server, model, eval_images(synthetic_data, 2)


def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(server, path, body, raw: bytes | None = None, headers=None):
    """-> (status, parsed JSON body) of one request on a fresh connection."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    data = raw if raw is not None else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    status, payload = response.status, json.loads(response.read())
    conn.close()
    return status, payload


def test_the_openai_client_gets_the_offline_answers_plain_and_streamed(served):
    server, model, images = served
    offline = model.generate([images[0], None], [Q, "Say something."], max_new_tokens=TOKENS)
    api = client(server)
    assert [m.id for m in api.models.list().data] == ["tiny"]
    answer = api.chat.completions.create(model="tiny", messages=user_message(Q, data_url(images[0])),
                                         max_tokens=TOKENS)
    assert answer.choices[0].message.content == offline[0]
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.completion_tokens <= TOKENS
    assert answer.usage.prompt_tokens > answer.usage.completion_tokens > 0
    chunks = list(api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Say something."}],
                                              max_tokens=TOKENS, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == offline[1] and sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 1
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-2].choices[0].finish_reason in ("stop", "length")
    # a stop string cuts the answer where the offline text has it
    stop = offline[0][2:4]
    cut = api.chat.completions.create(model="tiny", messages=user_message(Q, data_url(images[0])),
                                      max_tokens=TOKENS, stop=[stop])
    assert cut.choices[0].message.content == offline[0][:offline[0].index(stop)].strip()
    assert cut.choices[0].finish_reason == "stop"


def test_client_mistakes_get_4xx_openai_errors(served):
    import openai

    server, model, images = served
    good = user_message(Q, data_url(images[0]))
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client(server).chat.completions.create(model="tiny", messages=good, n=2)
    mistakes = [
        (dict(messages=good, frobnicate=1), 400, "unknown field 'frobnicate'"),
        (dict(messages=good, max_tokens=TOKENS + 1), 400, "over this server's limit of 16"),
        (dict(messages=good, temperature="hot"), 400, "temperature must be a number"),
        (dict(messages=[{"role": "system", "content": "be brief"}] + good), 400, "system messages"),
        (dict(messages=[{"role": "assistant", "content": "hi"}]), 400, "alternate user/assistant"),
        (dict(messages=user_message(Q, "https://example.com/a.png")), 400, "remote image URLs are not fetched"),
        (dict(messages=user_message(Q, images[0])), 403, "--allow-local-images"),
        (dict(messages=user_message(Q, "data:image/png;base64,!!not base64!!")), 400, "not valid base64"),
        (dict(messages=user_message(Q, "data:image/png;base64,aGVsbG8=")), 400, "could not be read"),
        (dict(messages=user_message(Q, "data:image/png;base64," + __import__("base64").b64encode(
            png_header(100000, 100000)).decode())), 413, "pixels"),
        (dict(messages=user_message(Q, "data:image/png;base64," + "A" * (2 ** 21))), 413, "over the limit"),
        (dict(messages=user_message("word " * 400)), 400, "over this server's limit of 256"),
        (dict(messages="hello"), 400, "non-empty list"),
        (dict(messages=good, stream="yes"), 400, "stream must be"),
    ]
    for body, status, message in mistakes:
        got, payload = post(server, "/v1/chat/completions", body)
        assert (got, set(payload["error"])) == (status, {"message", "type", "param", "code"}), (body, payload)
        assert message in payload["error"]["message"]
    assert post(server, "/v1/chat/completions", None, raw=b"{not json")[0] == 400
    assert post(server, "/v1/chat/completions", None, raw=b"[]")[0] == 400
    assert post(server, "/v1/nothing", {})[0] == 404
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    for path, status in (("/health", 200), ("/static/../server.py", 404), ("/static/none.js", 404), ("/x", 404)):
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == status and json.loads(response.read())
    # the server still answers
    assert client(server).chat.completions.create(model="tiny", messages=good, max_tokens=2).choices[0].message


def test_slice_plan_endpoint_is_the_models_plan(served):
    server, model, images = served
    status, plan = post(server, "/v1/slice_plan", {"image_url": data_url(images[1])})
    expected = model.slice_plan(images[1])
    assert status == 200 and plan["tokens"] == expected["tokens"] and plan["scheme"] == expected["scheme"]
    assert plan["input_size"] == list(expected["input_size"]) and len(plan["cells"]) == len(expected["cells"])
    assert post(server, "/v1/slice_plan", {"image_url": "https://example.com/a.png"})[0] == 400
    assert post(server, "/v1/slice_plan", {"image": "x"})[0] == 400


def test_a_client_leaving_mid_stream_frees_its_slot(served, monkeypatch):
    server, model, images = served
    # decoding slowed to 20 ms a step, so that each answer is still being decoded when its client leaves
    step = server.engine._step
    monkeypatch.setattr(server.engine, "_step", lambda: (time.sleep(0.02), step()))
    body = json.dumps({"messages": [{"role": "user", "content": "Say something."}], "max_tokens": TOKENS,
                       "stream": True}).encode()
    cancelled = server.engine.finished["cancelled"]
    for _ in range(3):
        sock = socket.create_connection(server.server_address[:2], timeout=60)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert sock.recv(64).startswith(b"HTTP/1.1 200")
        sock.close()
    deadline = time.time() + 30
    while server.engine.finished["cancelled"] - cancelled < 3:   # each stopped before its 16 tokens
        assert time.time() < deadline, f"{server.engine.finished} after three clients left"
        time.sleep(0.05)
    assert not any(server.engine._rows) and not server.engine._pending
    assert client(server).chat.completions.create(model="tiny", messages=user_message("Say something."),
                                                  max_tokens=2).choices[0].message.content is not None


def test_cli_mistakes_are_one_line(capsys, tmp_path):
    from uhd_jax.cli import serve

    assert serve.main(["--checkpoint", str(tmp_path), "--slots", "0"]) == 2
    assert "--slots must be at least 1" in capsys.readouterr().err
    assert serve.main(["--checkpoint", str(tmp_path / "none")]) == 2
    assert "not found" in capsys.readouterr().err
