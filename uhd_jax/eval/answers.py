"""Question and answer files in the originals' `model_vqa` format (spec llava15_slime_llavar.md §B.1).

Questions: JSON lines `{"question_id", "image", "text", ["category"], ...}`. Answers: JSON lines `{"question_id",
"prompt" (the question text), "text" (the answer), "answer_id", "model_id", "metadata"}`, appended a batch at a time,
so a killed run loses at most the batch in flight and a rerun skips every id already answered. Sharding follows
`--num-chunks/--chunk-idx` of the originals: contiguous chunks of ceil(n / k) questions.
"""
from __future__ import annotations

import json
import math
import os
import uuid

from uhd_jax.cli_errors import UserError

_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"   # shortuuid's 57 symbols


def short_id() -> str:
    """A 22-character random id in shortuuid's alphabet (the originals' `answer_id`)."""
    n = uuid.uuid4().int
    out = []
    for _ in range(22):
        n, r = divmod(n, len(_ALPHABET))
        out.append(_ALPHABET[r])
    return "".join(out)


def _lines(path: str, what: str):
    """(line number, text) of a JSON-lines file; a file that is not UTF-8 text is named, not a traceback."""
    try:
        with open(path, encoding="utf-8") as f:
            return list(enumerate(f.read().split("\n"), 1))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a text file ({e.reason} at byte {e.start}); give the {what} in JSON lines") \
            from None


def read_questions(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise UserError(f"question file {path} not found; give a JSON-lines file of {{question_id, image, text}}")
    questions, seen = [], set()
    for lineno, line in _lines(path, "questions"):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e}); a question file holds one JSON object a "
                            f"line") from None
        if not isinstance(q, dict) or "question_id" not in q or not isinstance(q.get("text"), str):
            raise UserError(f"{path}:{lineno}: a question needs 'question_id' and a 'text' string, got "
                            f"{line.strip()[:80]}")
        try:
            hash(q["question_id"])
        except TypeError:
            raise UserError(f"{path}:{lineno}: question_id must be a string or a number, got "
                            f"{q['question_id']!r}") from None
        if q["question_id"] in seen:
            raise UserError(f"{path}:{lineno}: question_id {q['question_id']!r} appears twice")
        seen.add(q["question_id"])
        questions.append(q)
    return questions


def chunk(items: list, num_chunks: int, index: int) -> list:
    """The `index`-th of `num_chunks` contiguous chunks of ceil(len / num_chunks) items (the originals' split)."""
    if not 0 <= index < num_chunks:
        raise ValueError(f"chunk index {index} is outside 0..{num_chunks - 1}")
    size = math.ceil(len(items) / num_chunks) if items else 0
    return items[index * size:(index + 1) * size]


def read_answers(path: str) -> list[dict]:
    """Answer lines; a last line cut short by a crash is ignored (its question is answered again)."""
    if not os.path.exists(path):
        return []
    if os.path.isdir(path):
        raise UserError(f"answer file {path} is a directory; give a file path (JSON lines)")
    out = []
    lines = _lines(path, "answers")
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            a = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno < len(lines):   # only the unterminated last line may be torn
                raise UserError(f"{path}:{lineno}: not valid JSON ({e}); the answer file is corrupt: fix or delete "
                                f"that line (its question is answered again)") from None
            continue
        if not isinstance(a, dict) or "question_id" not in a or not isinstance(a.get("text"), str):
            raise UserError(f"{path}:{lineno}: an answer needs 'question_id' and a 'text' string, got "
                            f"{line.strip()[:80]}; is this an answer file written by uhd-generate?")
        out.append(a)
    return out


def answer_record(question: dict, text: str, model_id: str, metadata: dict | None = None) -> dict:
    return {"question_id": question["question_id"], "prompt": question["text"], "text": text,
            "answer_id": short_id(), "model_id": model_id, "metadata": metadata or {}}


class AnswerFile:
    """Appends answers to `path`; `done` holds the ids already there (from an earlier, interrupted run)."""

    def __init__(self, path: str):
        self.path = path
        existing = read_answers(path)
        self.done = {a["question_id"] for a in existing}
        if existing:   # rewrite without a torn last line before appending
            with open(path + ".tmp", "w") as f:
                f.writelines(json.dumps(a) + "\n" for a in existing)
            os.replace(path + ".tmp", path)
        elif os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)

    def write(self, records: list[dict]) -> None:
        with open(self.path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())
        self.done.update(r["question_id"] for r in records)
