"""The added benchmarks' files as released, read into question files (`uhd-generate --questions`) and annotations.

  scienceqa    LLaVA's llava_test_CQM-A.json (ids, images, the CQM-A prompt) + images/test; scored on the official
               problems.json and pid_splits.json of the same folder.
  mmbench(_cn) the released TSV or xlsx (index, question, hint, A-D, answer, category, image as base64). Files
               whose rows hold no circular copies (index >= 1e6) get them here, VLMEvalKit's way: a question with n
               options is asked n times, the options rotated by one each time, copy k indexed index + k * 1e6.
  seed         SEED-Bench.json (questions, choice_a-d, answer, data_type, question_type_id); image questions only.
  mmmu         the HF release's parquet files (MMMU/<Subject>/validation-*.parquet, else test-*.parquet: answers for the
               server only; image_1 as PNG/JPEG bytes), or validation.jsonl of the same fields: id, question, options
               (a list, or its Python repr as in the parquet files), answer, question_type, image_1 (a path under
               images/).
  ocrbench     OCRBench.json (dataset_name, id, image_path, question, answers, type) + OCRBench_Images.
  realworldqa  the HF release's parquet files (data/test-*.parquet: image bytes, question, answer), or test.jsonl of
               those fields with the image as a path; the id is the row number.
  hrbench4k/8k the released TSV (or xlsx) (index, question, answer, category, cycle_category, A-D, image as base64).
  vizwiz       the official val.json, else test.json (image, question[, answers, answer_type]) + val/ or test/.
  llava_bench  the released folder: questions.jsonl (already in model_vqa format), context.jsonl, answers_gpt4.jsonl.
  mmvet        mm-vet.json ({v1_N: imagename, question, answer, capability}) + images/.

Prompts are written whole into the question files (the family's rule then adds nothing): each family of benchmarks
as its original eval script builds it (see `question_text`).
"""
from __future__ import annotations

import ast
import base64
import csv
import dataclasses
import glob
import json
import os
import sys

from uhd_jax.cli_errors import UserError
from uhd_jax.eval.benchmarks import BENCHMARKS, HR_LETTER, LETTER, LETTER_CN, VIZWIZ

CIRCULAR = 1_000_000
# MMMU's llava1.5 config: "{question}\n{options}\nAnswer with ..." (the options end with a newline), or
# "{question}\nAnswer ..." for open questions
MMMU_MC = "\nAnswer with the option's letter from the given choices directly."
MMMU_OPEN = "\nAnswer the question using a single word or phrase."


@dataclasses.dataclass(frozen=True)
class Prepared:
    questions: str        # JSON lines for uhd-generate
    image_folder: str
    annotations: str      # what `score_answers` reads for this benchmark


def _read_json_or_lines(path: str):
    if not os.path.isfile(path):
        raise UserError(f"{path} not found")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith(".jsonl"):   # one record on its one line is also a JSON document
            raise json.JSONDecodeError("JSON lines", text, 0)
        return json.loads(text)
    except json.JSONDecodeError:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: neither JSON nor JSON lines ({e.msg})") from None


def read_tsv(path: str) -> list[dict]:
    """Rows of a released MMBench / HR-Bench table, TSV or xlsx, every cell as text (its image column is base64 and
    can be megabytes long)."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found; give the benchmark's released TSV")
    if path.lower().endswith(".xlsx"):
        rows = _xlsx_rows(path)
    else:
        csv.field_size_limit(sys.maxsize)
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or "index" not in rows[0] or "question" not in rows[0]:
        raise UserError(f"{path}: no 'index' and 'question' columns; is this the benchmark's TSV?")
    return rows


def _xlsx_rows(path: str) -> list[dict]:
    """The first sheet's rows under its header; empty cells as '' and numbers as the TSV writes them ('3', '2.5')."""
    try:
        import openpyxl
    except ImportError:
        raise UserError(f"{path}: reading xlsx needs openpyxl: pip install 'uhd-jax[formats]'") from None
    book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    try:
        cells = list(book.worksheets[0].iter_rows(values_only=True))
    finally:
        book.close()
    if not cells:
        return []

    def text(v):
        if v is None:
            return ""
        if isinstance(v, float) and v.is_integer():
            return str(int(v))
        return str(v)
    header = [text(h) for h in cells[0]]
    return [dict(zip(header, map(text, row))) for row in cells[1:] if any(v is not None for v in row)]


def parquet_rows(files: list[str]) -> list[dict]:
    """The rows of released parquet files, in file order (image columns stay {'bytes', 'path'} dicts)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{files[0]}: reading parquet needs pyarrow: pip install 'uhd-jax[formats]'") from None
    rows = []
    for f in files:
        try:
            rows += pq.read_table(f).to_pylist()
        except Exception as e:   # pyarrow's errors have no common base worth naming
            raise UserError(f"{f}: not a readable parquet file ({e})") from None
    return rows


def _image_bytes(cell, folder: str, name: str) -> str | None:
    """A parquet image cell ({'bytes', 'path'} or raw bytes) saved under `folder`; its file name."""
    data = cell.get("bytes") if isinstance(cell, dict) else cell
    if not data:
        return None
    return _save_bytes(data, folder, name)


def _given(value) -> bool:
    """MMBench's is_none: pandas reads an empty cell as nan; the TSV's text says 'nan' or 'none' for no option."""
    return value is not None and str(value).strip() != "" and str(value).strip().lower() not in ("nan", "none")


def mmb_options(row: dict) -> dict[str, str]:
    return {c: row[c] for c in "ABCDEFGHI" if c in row and _given(row[c])}


def mmbench_records(path: str) -> list[dict]:
    """The TSV's rows with their options, plus circular copies when the file has none."""
    rows = read_tsv(path)
    out = []
    for r in rows:
        out.append({**r, "index": int(r["index"]), "options": mmb_options(r)})
    if any(r["index"] >= CIRCULAR for r in out):
        return out
    copies = []
    for r in out:
        letters = list(r["options"])
        texts = [r["options"][c] for c in letters]
        for k in range(1, len(letters)):
            rotated = dict(zip(letters, texts[k:] + texts[:k]))
            answer = r.get("answer")
            if answer in letters:   # the right text moves k places up
                answer = letters[(letters.index(answer) - k) % len(letters)]
            copies.append({**r, "index": r["index"] + k * CIRCULAR, "options": rotated, "answer": answer})
    return out + copies


def _save_image(b64: str, folder: str, name: str) -> str:
    return _save_bytes(base64.b64decode(b64), folder, name)


def _save_bytes(data: bytes, folder: str, name: str) -> str:
    ext = ".png" if data[:8] == b"\x89PNG\r\n\x1a\n" else ".jpg"
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name + ext), "wb") as f:
        f.write(data)
    return name + ext


def question_text(benchmark: str, record: dict) -> str:
    """The human turn (without the image placeholder) each original builds for one record."""
    if benchmark in ("mmbench", "mmbench_cn"):      # LLaVA's model_vqa_mmbench with --single-pred-prompt
        q = record["question"]
        if _given(record.get("hint")):
            q = record["hint"] + "\n" + q
        for letter, option in record["options"].items():
            q += f"\n{letter}. {option}"
        return q + (LETTER_CN if benchmark == "mmbench_cn" else LETTER)
    if benchmark in ("hrbench4k", "hrbench8k"):     # lmms-eval's hrbench_doc_to_text
        opts = "".join(f"{c}. {record[c]}\n" for c in "ABCD" if _given(record.get(c)))
        return f"{record['question'].strip()}\n{opts}" + HR_LETTER.lstrip("\n")
    if benchmark == "seed":                          # LLaVA's llava-seed-bench.jsonl
        opts = "".join(f"\n{c.upper()}. {record['choice_' + c]}" for c in "abcd")
        return record["question"] + opts + LETTER
    if benchmark == "mmmu":                          # MMMU's construct_prompt with the llava1.5 config
        if record["question_type"] == "multiple-choice":
            opts = "".join(f"({chr(65 + i)}) {o}\n" for i, o in enumerate(mmmu_options(record)))
            return f"{record['question']}\n{opts}" + MMMU_MC
        return record["question"] + MMMU_OPEN
    if benchmark == "vizwiz":
        return record["question"] + VIZWIZ
    raise KeyError(benchmark)


def mmmu_options(record: dict) -> list[str]:
    options = record.get("options") or []
    if isinstance(options, str):
        options = ast.literal_eval(options) if options.strip() else []
    return [str(o) for o in options]


def mmmu_choice_letter(record: dict, text: str, rng) -> str:
    """A multiple-choice record's answer parsed to its letter as MMMU's script does (`rng`: its seeded `random`)."""
    from uhd_jax.eval.metrics.choice import mmmu_choice

    options = mmmu_options(record)
    letters = [chr(65 + i) for i in range(len(options))]
    return mmmu_choice(text, letters, dict(zip(letters, options)), rng)


def _write_questions(path: str, questions: list[dict]) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(q, ensure_ascii=False) + "\n" for q in questions)
    return path


def _need(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise UserError(f"{path} not found: {what}")
    return path


def prepare(benchmark: str, source: str, out_dir: str) -> Prepared:
    """Question file (written under `out_dir`), image folder and annotation path of `benchmark` released at
    `source` (the file or folder `SOURCES` names under a data root)."""
    if benchmark not in PREPARERS:
        raise UserError(f"no reader for {benchmark!r}; the readers cover {sorted(PREPARERS)}")
    return PREPARERS[benchmark](source, out_dir)


def _scienceqa(folder, out):
    questions_file = _need(os.path.join(folder, "llava_test_CQM-A.json"), "LLaVA's ScienceQA test questions")
    _need(os.path.join(folder, "problems.json"), "ScienceQA's problems.json")
    qs = []
    for r in _read_json_or_lines(questions_file):
        q = {"question_id": r["id"], "text": r["conversations"][0]["value"].replace("<image>", "").strip() + LETTER}
        if r.get("image"):
            q["image"] = r["image"]
        qs.append(q)
    return Prepared(_write_questions(os.path.join(out, "questions.jsonl"), qs), os.path.join(folder, "images", "test"),
                    folder)


def _mmbench(benchmark):
    def read(tsv, out):
        qs, images = [], os.path.join(out, "images")
        for r in mmbench_records(tsv):
            main = r["index"] % CIRCULAR
            name = f"{main}"
            if not any(os.path.exists(os.path.join(images, name + e)) for e in (".jpg", ".png")):
                _save_image(r["image"], images, name)
            ext = ".png" if os.path.exists(os.path.join(images, name + ".png")) else ".jpg"
            qs.append({"question_id": r["index"], "image": name + ext, "text": question_text(benchmark, r)})
        return Prepared(_write_questions(os.path.join(out, "questions.jsonl"), qs), images, tsv)
    return read


def _hrbench(benchmark):
    def read(tsv, out):
        qs, images = [], os.path.join(out, "images")
        for r in read_tsv(tsv):
            name = _save_image(r["image"], images, str(r["index"]))
            qs.append({"question_id": int(r["index"]), "image": name, "text": question_text(benchmark, r)})
        return Prepared(_write_questions(os.path.join(out, "questions.jsonl"), qs), images, tsv)
    return read


def _seed(folder, out):
    ann = _need(os.path.join(folder, "SEED-Bench.json"), "SEED-Bench's annotation file")
    data = _read_json_or_lines(ann)
    qs = [{"question_id": q["question_id"], "image": q["data_id"], "text": question_text("seed", q)}
          for q in data["questions"] if q.get("data_type") == "image"]
    return Prepared(_write_questions(os.path.join(out, "questions.jsonl"), qs),
                    os.path.join(folder, "SEED-Bench-image"), ann)


def mmmu_split(folder: str) -> tuple[str, list[str]]:
    """('validation' or 'test', its parquet files) of an MMMU release folder; validation when it is there."""
    for split in ("validation", "test"):
        files = sorted(glob.glob(os.path.join(folder, "**", f"{split}-*.parquet"), recursive=True))
        if files:
            return split, files
    return "", []


def _mmmu(folder, out):
    """The parquet release is written out as <split>.jsonl beside its images (the annotations the scorer reads);
    a folder with validation.jsonl and images/ is read as it is."""
    if os.path.exists(os.path.join(folder, "validation.jsonl")):
        ann, images = os.path.join(folder, "validation.jsonl"), os.path.join(folder, "images")
        records = _read_json_or_lines(ann)
    else:
        split, files = mmmu_split(folder)
        if not files:
            raise UserError(f"{folder}: no MMMU release (<Subject>/validation-*.parquet or test-*.parquet, or "
                            f"validation.jsonl); give the folder of the HF dataset MMMU/MMMU")
        images, records = os.path.join(out, "images"), []
        for r in parquet_rows(files):
            keep = {k: r.get(k) for k in ("id", "question", "options", "answer", "question_type")}
            name = _image_bytes(r.get("image_1"), images, str(r["id"]))
            if name:
                keep["image_1"] = name
            records.append(keep)
        ann = os.path.join(out, f"{split}.jsonl")
        _write_questions(ann, records)
    qs = []
    for r in records:
        q = {"question_id": r["id"], "text": question_text("mmmu", r)}
        if r.get("image_1"):
            q["image"] = r["image_1"]   # LLaVA answers with the first image only, as MMMU's run_llava.py
        qs.append(q)
    return Prepared(_write_questions(os.path.join(out, "questions.jsonl"), qs), images, ann)


def _ocrbench(folder, out):
    ann = _need(os.path.join(folder, "OCRBench.json"), "OCRBench's OCRBench.json")
    qs = [{"question_id": r["id"], "image": r["image_path"], "text": r["question"]} for r in _read_json_or_lines(ann)]
    return Prepared(_write_questions(os.path.join(out, "questions.jsonl"), qs),
                    os.path.join(folder, "OCRBench_Images"), ann)


def _realworldqa(folder, out):
    if os.path.exists(os.path.join(folder, "test.jsonl")):
        ann, images = os.path.join(folder, "test.jsonl"), folder
        records = _read_json_or_lines(ann)
    else:
        files = sorted(glob.glob(os.path.join(folder, "**", "test-*.parquet"), recursive=True))
        if not files:
            raise UserError(f"{folder}: no RealWorldQA release (data/test-*.parquet, or test.jsonl)")
        images, records = os.path.join(out, "images"), []
        for i, r in enumerate(parquet_rows(files)):
            records.append({"question": r["question"], "answer": r["answer"],
                            "image": _image_bytes(r.get("image"), images, str(i))})
        ann = _write_questions(os.path.join(out, "test.jsonl"), records)
    qs = [{"question_id": i, "image": r["image"], "text": r["question"].strip()} for i, r in enumerate(records)]
    return Prepared(_write_questions(os.path.join(out, "questions.jsonl"), qs), images, ann)


def _vizwiz(folder, out):
    """val.json (with answers: scored here) when there, else test.json (answers for the server only)."""
    split = "val" if os.path.exists(os.path.join(folder, "val.json")) else "test"
    ann = _need(os.path.join(folder, f"{split}.json"), "VizWiz's val.json or test.json")
    qs = [{"question_id": r["image"], "image": r["image"], "text": question_text("vizwiz", r)}
          for r in _read_json_or_lines(ann)]
    return Prepared(_write_questions(os.path.join(out, "questions.jsonl"), qs), os.path.join(folder, split), ann)


def _llava_bench(folder, out):
    return Prepared(_need(os.path.join(folder, "questions.jsonl"), "LLaVA-Bench's questions.jsonl"),
                    os.path.join(folder, "images"), folder)


def _mmvet(folder, out):
    ann = _need(os.path.join(folder, "mm-vet.json"), "MM-Vet's mm-vet.json")
    qs = [{"question_id": k, "image": v["imagename"], "text": v["question"]}
          for k, v in _read_json_or_lines(ann).items()]
    return Prepared(_write_questions(os.path.join(out, "questions.jsonl"), qs), os.path.join(folder, "images"), ann)


PREPARERS = {"scienceqa": _scienceqa, "mmbench": _mmbench("mmbench"), "mmbench_cn": _mmbench("mmbench_cn"),
             "seed": _seed, "mmmu": _mmmu, "ocrbench": _ocrbench, "realworldqa": _realworldqa,
             "hrbench4k": _hrbench("hrbench4k"), "hrbench8k": _hrbench("hrbench8k"), "vizwiz": _vizwiz,
             "llava_bench": _llava_bench, "mmvet": _mmvet}
assert set(PREPARERS) <= set(BENCHMARKS)
