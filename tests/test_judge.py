"""GPT-judged benchmarks against a fake OpenAI-compatible endpoint served in-process: the official prompts go out, the
replies are parsed and averaged by the official rules, reviews are cached and a rerun asks nothing."""
import http.server
import json
import threading

import pytest

from uhd_jax.eval import judge as judging
from uhd_jax.eval.scoring import score_answers


class FakeJudge(http.server.BaseHTTPRequestHandler):
    replies: list = []      # popped in order
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeJudge.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
        out = json.dumps({"choices": [{"message": {"content": FakeJudge.replies.pop(0)}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def endpoint():
    server = http.server.HTTPServer(("127.0.0.1", 0), FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_llava_bench_through_an_endpoint(tmp_path, endpoint, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    jsonl(tmp_path / "questions.jsonl", [
        {"question_id": 0, "image": "a.jpg", "text": "What is it?", "category": "conv"},
        {"question_id": 1, "image": "a.jpg", "text": "Describe it.", "category": "detail"},
        {"question_id": 2, "image": "b.jpg", "text": "Why?", "category": "complex"}])
    jsonl(tmp_path / "context.jsonl", [{"image": "a.jpg", "caption": ["A dog.", "On grass."]},
                                       {"image": "b.jpg", "caption": ["A cat."]}])
    jsonl(tmp_path / "answers_gpt4.jsonl", [{"question_id": i, "text": f"ref {i}"} for i in range(3)])
    answers = [{"question_id": i, "prompt": "", "text": f"mine {i}"} for i in range(3)]
    FakeJudge.replies[:] = ["8 6\nAssistant 2 is shorter.", "10,5\nok", "not a score"]
    FakeJudge.seen.clear()
    judge = judging.Judge(endpoint, "gpt-4-0314", key_env="JUDGE_KEY", wait=0.0)
    reviews = str(tmp_path / "reviews.jsonl")
    r = score_answers("llava_bench", answers, str(tmp_path), judge=judge, reviews_path=reviews)
    # pairs (8, 6), (10, 5), (-1, -1): the failed parse is averaged in (sic): 100 * (10/3) / (17/3)
    assert r["score"] == pytest.approx(100 * 10 / 17)
    assert r["metrics"]["conv"] == pytest.approx(75.0) and r["metrics"]["detail"] == pytest.approx(50.0)
    assert r["metrics"]["complex"] == pytest.approx(100.0)     # (-1) / (-1)
    first = FakeJudge.seen[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
    assert (first["model"], first["temperature"], first["max_tokens"]) == ("gpt-4-0314", 0.2, 1024)
    assert first["messages"][0] == {"role": "system", "content": judging.LLAVA_SYSTEM}
    assert first["messages"][1]["content"] == (
        "[Context]\nA dog.\nOn grass.\n\n[Question]\nWhat is it?\n\n[Assistant 1]\nref 0\n\n[End of Assistant 1]\n\n"
        "[Assistant 2]\nmine 0\n\n[End of Assistant 2]\n\n[System]\n" + judging.LLAVA_RULE + "\n\n")
    # a rerun reads the cached reviews and asks nothing
    again = score_answers("llava_bench", answers, str(tmp_path), judge=judge, reviews_path=reviews)
    assert again["score"] == pytest.approx(r["score"]) and len(FakeJudge.seen) == 3


def test_mmvet_grading_retries_as_the_official_evaluator(tmp_path, endpoint):
    data = {"v1_0": {"imagename": "v1_0.png", "question": "What is x?", "answer": "-1<AND>-5",
                     "capability": ["math", "ocr"]},
            "v1_1": {"imagename": "v1_1.png", "question": "Color?", "answer": "red", "capability": ["rec"]},
            "v1_2": {"imagename": "v1_2.png", "question": "Name?", "answer": "Bob", "capability": ["ocr"]}}
    (tmp_path / "mm-vet.json").write_text(json.dumps(data))
    answers = [{"question_id": k, "prompt": "", "text": t} for k, t in (("v1_0", "x = -1"), ("v1_1", "red"),
                                                                         ("v1_2", "Alice"))]
    # v1_0: 0.5 at once; v1_1: a non-number, then 1.0 on the first retry; v1_2: six unreadable replies -> 0
    FakeJudge.replies[:] = ["0.5", "sure", "1.0"] + ["?"] * 6
    FakeJudge.seen.clear()
    judge = judging.Judge(endpoint, "gpt-4-0613", wait=0.0)
    r = score_answers("mmvet", answers, str(tmp_path), judge=judge, reviews_path=str(tmp_path / "grades.jsonl"))
    assert r["score"] == pytest.approx(100 * 1.5 / 3)
    assert r["metrics"]["capabilities"] == {"math": pytest.approx(50.0), "ocr": pytest.approx(25.0),
                                            "rec": pytest.approx(100.0)}
    assert len(FakeJudge.seen) == 9
    row = FakeJudge.seen[0]["messages"][0]["content"]
    assert row == judging.MMVET_PROMPT + "\nWhat is x? | -1 <AND> -5 | x = -1 | "
    assert (FakeJudge.seen[0]["max_tokens"], FakeJudge.seen[0]["temperature"]) == (3, 0.0)
    assert FakeJudge.seen[2]["temperature"] == 0.0                 # v1_1's retry
    retries = FakeJudge.seen[4:]                                    # v1_2's: one first try, then 5 retries
    assert [s["temperature"] for s in retries] == [0.0, 0.5, 1.0, 1.5, 2.0]      # raised after each retry
    assert all(s["messages"][0]["content"].endswith(judging.MMVET_RETRY) for s in retries)
    assert judging.mmvet_submission(answers) == {"v1_0": "x = -1", "v1_1": "red", "v1_2": "Alice"}


def test_judged_benchmarks_need_an_endpoint(tmp_path):
    with pytest.raises(ValueError, match="--judge-url"):
        score_answers("mmvet", [{"question_id": "v1_0", "text": "a"}], str(tmp_path))
    with pytest.raises(ValueError, match="base URL"):
        judging.Judge("api.openai.com", "gpt-4")
