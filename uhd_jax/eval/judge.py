"""GPT-judged benchmarks through any OpenAI-compatible chat endpoint (`POST {url}/chat/completions`), with the
official judge prompts and score parsing.

LLaVA-Bench-in-the-Wild (LLaVA's eval_gpt_review_bench.py + summarize_gpt_review.py): per question the judge sees the
image's captions, the question, the reference (GPT-4) answer as assistant 1 and the model's as assistant 2, with the
rule of the question's category (rule.json's llava_bench_*), system prompt and temperature 0.2; the first line of the
review, commas as spaces, must be two numbers, else the pair counts as (-1, -1) and is still averaged (sic). Score per
category and overall = 100 * mean(model) / mean(reference).

MM-Vet (its mm-vet_evaluator.py): the few-shot prompt, then 'question | ground truth | prediction | ' as a table row;
max 3 tokens at temperature 0; the first word must be a number in [0, 1], else the row is asked again with 'Predict
the correctness of the answer (digit): ' appended and the temperature raised by 0.5 after each, until a 6th
try, whose reply is not read: 0. Total =
100 * mean score, per capability the mean over the questions that need it.

Reviews are appended to a JSON-lines cache, so a rerun asks only for what is missing. The API key is read from the
environment variable named on the command line (default OPENAI_API_KEY), never from a flag.
"""
from __future__ import annotations

import collections
import json
import os
import time
import urllib.error
import urllib.request

from uhd_jax.cli_errors import UserError

LLAVA_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
LLAVA_RULE = ("We would like to request your feedback on the performance of two AI assistants in response to the user "
              "question displayed above. The user asks the question on observing an image. For your reference, the "
              "visual content in the image is represented with a few sentences describing the image. \nPlease rate "
              "the helpfulness, relevance, accuracy, level of details of their responses. Each assistant receives an "
              "overall score on a scale of 1 to 10, where a higher score indicates better overall performance.\n"
              "Please first output a single line containing only two values indicating the scores for Assistant 1 "
              "and 2, respectively. The two scores are separated by a space.\nIn the subsequent line, please provide "
              "a comprehensive explanation of your evaluation, avoiding any potential bias and ensuring that the "
              "order in which the responses were presented does not affect your judgment.")
# rule.json gives the same prompt to llava_bench_conv, _detail and _complex
LLAVA_CATEGORIES = ("conv", "detail", "complex")

MMVET_PROMPT = """Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. <AND> in the ground truth means it is totally right only when all elements in the ground truth are present in the prediction, and <OR> means it is totally right when any one element in the ground truth is present in the prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right). Just complete the last space of the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme talks about Iceland and Greenland. It's pointing out that despite their names, Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme is using humor to point out the misleading nature of Iceland's and Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest that these contradictions can lead to distrust or confusion. The humor in this meme is derived from the unexpected contrast between the names of the countries and their actual physical characteristics. | 1.0
"""
MMVET_RETRY = "\nPredict the correctness of the answer (digit): "


class Judge:
    """One OpenAI-compatible endpoint: `ask(messages, temperature, max_tokens) -> text`."""

    def __init__(self, url: str, model: str, key_env: str = "OPENAI_API_KEY", timeout: float = 120.0,
                 retries: int = 5, wait: float = 2.0):
        if not url.startswith(("http://", "https://")):
            raise UserError(f"--judge-url {url}: give the endpoint's base URL, e.g. https://api.openai.com/v1")
        self.url = url.rstrip("/") + "/chat/completions"
        self.model, self.key = model, os.environ.get(key_env, "")
        self.timeout, self.retries, self.wait = timeout, retries, wait

    def ask(self, messages: list[dict], temperature: float, max_tokens: int) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": temperature,
                           "max_tokens": max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        last = None
        for attempt in range(self.retries):
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return json.loads(r.read())["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code} {e.reason}"
                if e.code in (400, 401, 403, 404):   # a wrong key, model or URL does not get better by waiting
                    break
            except (urllib.error.URLError, TimeoutError, OSError, KeyError, IndexError, ValueError) as e:
                last = str(e)
            time.sleep(self.wait * (attempt + 1))
        raise UserError(f"judge endpoint {self.url} failed ({last}); check --judge-url, --judge-model and the API key")


class ReviewCache:
    """{key: review} kept as JSON lines, appended as reviews arrive."""

    def __init__(self, path: str):
        self.path, self.items = path, {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        try:
                            r = json.loads(line)
                        except json.JSONDecodeError:   # a line torn by a crash is asked again
                            continue
                        self.items[str(r["key"])] = r

    def add(self, review: dict) -> None:
        self.items[str(review["key"])] = review
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(review, ensure_ascii=False) + "\n")


def _jsonl(path):
    if not os.path.isfile(path):
        raise UserError(f"{path} not found; give the released LLaVA-Bench folder")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def llava_pair(review: str) -> list[float]:
    """The first line's two scores, or [-1, -1] (eval_gpt_review_bench.parse_score)."""
    try:
        parts = review.split("\n")[0].replace(",", " ").split(" ")
        return [float(parts[0]), float(parts[1])] if len(parts) == 2 else [-1.0, -1.0]
    except ValueError:
        return [-1.0, -1.0]


def llava_bench_content(caption: str, question: str, reference: str, answer: str) -> str:
    return (f"[Context]\n{caption}\n\n[Question]\n{question}\n\n"
            f"[Assistant 1]\n{reference}\n\n[End of Assistant 1]\n\n"
            f"[Assistant 2]\n{answer}\n\n[End of Assistant 2]\n\n[System]\n{LLAVA_RULE}\n\n")


def score_llava_bench(answers: list[dict], folder: str, judge: Judge, cache_path: str):
    questions = _jsonl(os.path.join(folder, "questions.jsonl"))
    context = {c["image"]: c for c in _jsonl(os.path.join(folder, "context.jsonl"))}
    reference = {str(r["question_id"]): r for r in _jsonl(os.path.join(folder, "answers_gpt4.jsonl"))}
    preds = {str(a["question_id"]): a for a in answers}
    cache = ReviewCache(cache_path)
    pairs, by_cat = [], collections.defaultdict(list)
    for q in questions:
        qid = str(q["question_id"])
        if qid not in preds:
            continue
        if q["category"] not in LLAVA_CATEGORIES:
            raise UserError(f"LLaVA-Bench question {qid}: category {q['category']!r} has no rule")
        if qid not in cache.items:
            content = llava_bench_content("\n".join(context[q["image"]]["caption"]), q["text"],
                                          reference[qid]["text"], preds[qid]["text"])
            review = judge.ask([{"role": "system", "content": LLAVA_SYSTEM}, {"role": "user", "content": content}],
                               temperature=0.2, max_tokens=1024)
            cache.add({"key": qid, "question_id": q["question_id"], "category": "llava_bench_" + q["category"],
                       "content": review, "tuple": llava_pair(review)})
        pair = cache.items[qid]["tuple"]
        by_cat[q["category"]].append(pair)
        by_cat["all"].append(pair)
        pairs.append((preds[qid], q))

    def relative(rows):
        ref, mine = (sum(r[i] for r in rows) / len(rows) for i in (0, 1))
        return 100.0 * mine / ref if ref else 0.0
    metrics = {"relative": relative(by_cat["all"]) if by_cat["all"] else 0.0}
    metrics.update({c: relative(v) for c, v in sorted(by_cat.items()) if c != "all"})
    known = {str(q["question_id"]) for q in questions}
    return metrics, pairs, [a["question_id"] for a in answers if str(a["question_id"]) not in known]


def mmvet_row(question: str, truth: str, prediction: str) -> str:
    return MMVET_PROMPT + "\n" + " | ".join(
        [question, truth.replace("<AND>", " <AND> ").replace("<OR>", " <OR> "), prediction, ""])


def mmvet_grade(judge: Judge, question: str, truth: str, prediction: str) -> tuple[float, str]:
    content = judge.ask([{"role": "user", "content": mmvet_row(question, truth, prediction)}], 0.0, 3)
    temperature, tries = 0.0, 1
    while True:
        try:
            score = float(content.split(" ")[0].strip())
            if 0.0 <= score <= 1.0:
                return score, content
        except ValueError:
            pass
        # sic: each retry runs at the temperature before its raise, and the sixth reply is never read
        content = judge.ask([{"role": "user", "content": mmvet_row(question, truth, prediction) + MMVET_RETRY}],
                            temperature, 3)
        tries += 1
        temperature += 0.5
        if tries > 5:
            return 0.0, content


def mmvet_submission(answers: list[dict]) -> dict:
    """The file MM-Vet's evaluator (and its online grader) reads: {"v1_N": answer}."""
    return {str(a["question_id"]): a["text"] for a in answers}


def score_mmvet(answers: list[dict], path: str, judge: Judge, cache_path: str):
    if os.path.isdir(path):
        path = os.path.join(path, "mm-vet.json")
    if not os.path.isfile(path):
        raise UserError(f"{path} not found; give MM-Vet's mm-vet.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    preds = {str(a["question_id"]): a for a in answers}
    cache = ReviewCache(cache_path)
    pairs, by_cap, scores = [], collections.defaultdict(list), []
    for qid, item in data.items():
        if qid not in preds:
            continue
        if qid not in cache.items:
            score, content = mmvet_grade(judge, item["question"], item["answer"], preds[qid]["text"])
            cache.add({"key": qid, "content": content, "score": score})
        score = cache.items[qid]["score"]
        scores.append(score)
        for cap in set(item["capability"]):
            by_cap[cap].append(score)
        pairs.append((preds[qid], item))
    metrics = {"total": 100.0 * sum(scores) / len(scores) if scores else 0.0}
    metrics["capabilities"] = {c: 100.0 * sum(v) / len(v) for c, v in sorted(by_cap.items())}
    return metrics, pairs, [a["question_id"] for a in answers if str(a["question_id"]) not in data]
