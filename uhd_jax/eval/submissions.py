"""Upload files of the benchmarks whose servers (or own tools) score them, each in its original's format, written
beside the answers by `uhd-evaluate` and the suites:

  vizwiz   answers_upload.json   [{image, answer}], EvalAI's answer processor applied (extra_scoring)
  seed     answers_upload.jsonl  {question_id, prediction} per answered image question (extra_scoring)
  mmvet    mmvet_submission.json {v1_N: answer} (judge)
  mmbench  answers_upload.xlsx   LLaVA's convert_mmbench_for_submission.py: the released table's rows without hint,
                                 category, source, image, comment and l2-category, a 'prediction' column (the answer
                                 text) inserted as the seventh; a row without an answer leaves it empty
  mmmu     answers_upload.json   MMMU's run_llava.py output, what its evaluator and EvalAI read: {id: the letter
                                 parsed from a multiple-choice answer (parse_multi_choice_response, random seeded
                                 with 42), the answer text of an open question}
"""
from __future__ import annotations

import json
import os
import random

from uhd_jax.cli_errors import UserError

MMBENCH_DROPPED = ("hint", "category", "source", "image", "comment", "l2-category")


def mmbench_table(answers: list[dict], table: str) -> tuple[list[str], list[list]]:
    """(header, rows) of MMBench's upload sheet for the answers to the rows of `table` (TSV or xlsx)."""
    from uhd_jax.eval.benchmark_formats import read_tsv

    rows = read_tsv(table)
    header = [h for h in rows[0] if h not in MMBENCH_DROPPED]
    header.insert(6, "prediction")
    preds = {str(a["question_id"]): a["text"] for a in answers}
    out = []
    for r in rows:
        cells = {**r, "index": int(r["index"]), "prediction": preds.get(str(int(r["index"])))}
        out.append([cells[h] if cells[h] != "" else None for h in header])
    return header, out


def write_mmbench(answers: list[dict], table: str, path: str) -> str:
    try:
        import openpyxl
    except ImportError:
        raise UserError("MMBench's upload file is xlsx: pip install 'uhd-jax[formats]' (openpyxl)") from None
    header, rows = mmbench_table(answers, table)
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(header)
    for row in rows:
        sheet.append(row)
    book.save(path)
    return path


def mmmu_submission(answers: list[dict], path: str) -> dict:
    from uhd_jax.eval.benchmark_formats import _read_json_or_lines, mmmu_choice_letter

    preds = {str(a["question_id"]): a["text"] for a in answers}
    rng = random.Random(42)
    out = {}
    for r in _read_json_or_lines(path):
        text = preds.get(str(r["id"]))
        if text is None:
            continue
        out[r["id"]] = mmmu_choice_letter(r, text, rng) if r["question_type"] == "multiple-choice" else text
    return out


def server_only(benchmark: str, annotations: str) -> bool:
    """Whether the annotations are a split without answers (scored only by the benchmark's server)."""
    from uhd_jax.eval.benchmark_formats import _read_json_or_lines, mmbench_records

    if benchmark == "vizwiz":
        return os.path.basename(annotations) == "test.json"
    if benchmark == "mmmu":
        return all(str(r.get("answer", "?")) == "?" for r in _read_json_or_lines(annotations))
    if benchmark in ("mmbench", "mmbench_cn"):
        return not any(r.get("answer") in r["options"] for r in mmbench_records(annotations))
    return False


def write(benchmark: str, answers: list[dict], annotations: str, out_dir: str) -> str | None:
    """The benchmark's upload file under `out_dir` (None for a benchmark without one)."""
    from uhd_jax.eval.extra_scoring import seed_submission, vizwiz_submission
    from uhd_jax.eval.judge import mmvet_submission

    os.makedirs(out_dir, exist_ok=True)
    if benchmark in ("mmbench", "mmbench_cn"):
        return write_mmbench(answers, annotations, os.path.join(out_dir, "answers_upload.xlsx"))
    if benchmark == "mmvet":
        path, data = os.path.join(out_dir, "mmvet_submission.json"), mmvet_submission(answers)
    elif benchmark == "mmmu":
        path, data = os.path.join(out_dir, "answers_upload.json"), mmmu_submission(answers, annotations)
    elif benchmark == "vizwiz" and server_only(benchmark, annotations):   # val answers are scored here
        path, data = os.path.join(out_dir, "answers_upload.json"), vizwiz_submission(answers, annotations)
    elif benchmark == "seed":
        path = os.path.join(out_dir, "answers_upload.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in seed_submission(answers, annotations))
        return path
    else:
        return None
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
    return path
