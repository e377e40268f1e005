"""The added benchmarks: answer extraction rules, prompts and scorers on small hand-made files in the released formats,
with expected scores worked out by hand from the originals' rules (quirks included)."""
import base64
import io
import json
import random

import pytest
from PIL import Image

from tests.file_helpers import write_json
from uhd_jax.eval import benchmark_formats as formats
from uhd_jax.eval.benchmarks import HR_LETTER, LETTER, VIZWIZ, eval_rule, prompt_text
from uhd_jax.eval.metrics.choice import (infer_option, mmmu_choice, mmmu_open_correct, mmmu_open_parse, sqa_choice)
from uhd_jax.eval.metrics.ocr import ocrbench_correct
from uhd_jax.eval.scoring import score_answers


def ans(qid, text):
    return {"question_id": qid, "prompt": "", "text": text}


def png_b64(color=(255, 0, 0)):
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path, header, rows):
    with open(path, "w") as f:
        f.write("\t".join(header) + "\n")
        for r in rows:
            f.write("\t".join(str(r.get(h, "")) for h in header) + "\n")
    return str(path)


# ---------------------------------------------------------------- extraction rules


def test_scienceqa_reads_the_letter_as_llava_does():
    assert sqa_choice("B", 3) == 1
    assert sqa_choice(" C ", 3) == 2                  # the stripped text is a letter
    assert sqa_choice("A. a cat", 3) == 0             # 'X. ' at the start
    assert sqa_choice("A.cat", 3) == -1               # no space after the period: not read
    assert sqa_choice("I think so.\nThe answer is B.", 3) == 1
    assert sqa_choice("The answer is C", 3) == 2
    assert sqa_choice("the answer is C", 3) == -1     # case-sensitive
    assert sqa_choice("E", 3) == -1                   # past the question's choices
    assert sqa_choice("b", 3) == -1


def test_mmbench_option_inference():
    opts = {"A": "red", "B": "blue", "C": "green"}
    assert infer_option("B", opts) == "B"
    assert infer_option("(C) green.", opts) == "C"
    assert infer_option("The answer is A", opts) == "A"     # 'A' stands alone among the words
    assert infer_option("A or B", opts) is None             # two letters: not decided
    assert infer_option("It is blue", opts) == "B"          # no letter: the one option text contained
    assert infer_option("red and blue", opts) is None
    assert infer_option("Answer: b", opts) is None          # letters are upper-case; 'b' is no option text
    assert infer_option("Z: none is blue", opts) is None    # a lone Z stops before the option texts
    assert infer_option("Cannot determine the answer, maybe blue", opts) is None


def test_mmmu_multiple_choice_parsing():
    rng = random.Random(0)
    letters, i2a = ["A", "B", "C", "D"], {"A": "dog", "B": "cat", "C": "bird", "D": "fish"}
    assert mmmu_choice("(B)", letters, i2a, rng) == "B"
    assert mmmu_choice("B.", letters, i2a, rng) == "B"                 # '.' stripped, ' B ' found
    assert mmmu_choice("(A) is wrong, (C) is right", letters, i2a, rng) == "C"   # the last mark wins
    assert mmmu_choice("I would say that it is a cat here", letters, i2a, rng) == "B"   # > 5 words: by content
    assert mmmu_choice("a cat", letters, i2a, random.Random(42)) == random.Random(42).choice(letters)  # <= 5 words
    assert mmmu_choice("Answer: A", letters, i2a, rng) == "A"


def test_mmmu_open_parsing_and_matching():
    # lower-cased first, so the '. ' + capital split never fires (sic); 'is ' picks the tail; the comma pattern reads
    # '1,234' and the simple one '234.5' (sic: 1,234.5 is never read whole)
    parsed = mmmu_open_parse("The total is 1,234.5 dollars")
    assert parsed == ["1,234.5 dollars", 1234.0, 234.5]
    assert mmmu_open_correct("1,234", parsed) and not mmmu_open_correct("1234.5", parsed)
    assert mmmu_open_parse("x = 3") == [3.0]          # '=' counts in the last sentence; the number normalised
    assert mmmu_open_correct("3", mmmu_open_parse("x = 3"))
    assert mmmu_open_correct("Paris", mmmu_open_parse("It is in paris"))   # string containment, lower-cased
    assert not mmmu_open_correct("a", mmmu_open_parse("banana"))           # one letter must stand as a word
    assert mmmu_open_correct(["7", "seven"], mmmu_open_parse("seven"))


def test_ocrbench_containment():
    assert ocrbench_correct("The word is HELLO.", ["hello"], "IIIT5K")
    assert not ocrbench_correct("hell", ["hello"], "IIIT5K")
    assert ocrbench_correct("x ^ { 2 }", "x^{2}", "HME100k")        # spaces dropped
    assert not ocrbench_correct("X^{2}", "x^{2}", "HME100k")        # and case kept


# ---------------------------------------------------------------- prompts


MMB_RECORD = {"question": "What color?", "hint": "nan", "options": {"A": "red", "B": "blue"}}
SEED_RECORD = {"question": "Q?", "choice_a": "1", "choice_b": "2", "choice_c": "3", "choice_d": "4"}


@pytest.mark.parametrize("bench,record,prompt", [
    # LLaVA's model_vqa_mmbench --single-pred-prompt: no hint when the cell is nan, options one per line
    ("mmbench", MMB_RECORD, "What color?\nA. red\nB. blue" + LETTER),
    ("mmbench", {**MMB_RECORD, "hint": "A car."}, "A car.\nWhat color?\nA. red\nB. blue" + LETTER),
    ("mmbench_cn", MMB_RECORD, "What color?\nA. red\nB. blue\n请直接回答选项字母。"),
    # lmms-eval's hrbench_doc_to_text: the question stripped, each option line ending in a newline
    ("hrbench4k", {"question": " Q? ", "A": "a", "B": "b", "C": "c", "D": "d"},
     "Q?\nA. a\nB. b\nC. c\nD. d\nAnswer the option letter directly."),
    # LLaVA's llava-seed-bench.jsonl
    ("seed", SEED_RECORD, "Q?\nA. 1\nB. 2\nC. 3\nD. 4" + LETTER),
    # MMMU's construct_prompt, llava1.5 config: '(A) x\n' per option, then the instruction after an empty line
    ("mmmu", {"question": "Q <image 1>?", "options": "['x', 'y']", "question_type": "multiple-choice"},
     "Q <image 1>?\n(A) x\n(B) y\n\nAnswer with the option's letter from the given choices directly."),
    ("mmmu", {"question": "Q?", "question_type": "open"}, "Q?\nAnswer the question using a single word or phrase."),
    ("vizwiz", {"question": "What is this?"},
     "What is this?\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n"
     "Answer the question using a single word or phrase."),
], ids=["mmbench", "mmbench-hint", "mmbench_cn", "hrbench", "seed", "mmmu-choice", "mmmu-open", "vizwiz"])
def test_prompt_rule(bench, record, prompt):
    assert formats.question_text(bench, record) == prompt


@pytest.mark.parametrize("bench,text", [
    ("mmbench", "Q\nA. x" + LETTER), ("hrbench8k", "Q\nA. x" + HR_LETTER), ("vizwiz", "Q" + VIZWIZ),
    ("ocrbench", "what is written?"), ("mmvet", "Explain."), ("realworldqa", "Q? Answer.")])
def test_family_rule_adds_nothing_to_a_complete_prompt(bench, text):
    """A question file that already ends with the suffix gets none added; the open benchmarks get none at all."""
    assert prompt_text(text, eval_rule("llava15", bench)) == "<image>\n" + text


def test_decoding_rules_of_the_added_benchmarks():
    assert eval_rule("llava15", "mmvet").max_new_tokens == 1024
    assert eval_rule("slime", "llava_bench").max_new_tokens == 1024
    assert eval_rule("uhd_v2", "mmvet").num_beams == 5 and eval_rule("uhd_v1", "scienceqa").num_beams == 3
    assert eval_rule("slime", "mmbench").max_new_tokens == 64


# ---------------------------------------------------------------- scorers on released formats


def test_scienceqa_scorer(tmp_path):
    problems = {"1": {"choices": ["a", "b"], "answer": 1, "image": "image.png"},
                "2": {"choices": ["a", "b", "c"], "answer": 0, "image": None},
                "3": {"choices": ["a", "b"], "answer": 0, "image": "image.png"},
                "4": {"choices": ["a", "b"], "answer": 0, "image": "image.png"},
                "9": {"choices": ["a", "b"], "answer": 0, "image": None}}
    write_json(tmp_path / "problems.json", problems)
    write_json(tmp_path / "pid_splits.json", {"test": ["1", "2", "3", "4"], "val": ["9"]})
    answers = [ans("1", "B"), ans("2", "The answer is A."), ans("3", "C"), ans("9", "A")]
    r = score_answers("scienceqa", answers, str(tmp_path))
    # right: 1 and 2 of 4 test problems ('C' is past problem 3's two choices; 4 unanswered counts wrong)
    assert r["metrics"]["accuracy"] == pytest.approx(50.0)
    # IMG: answered image problems 1 (right) and 3 (wrong); unanswered 4 drops out
    assert r["score"] == pytest.approx(50.0) and r["unmatched"] == ["9"]


def test_mmbench_circular_scorer_and_question_file(tmp_path):
    header = ["index", "question", "hint", "A", "B", "C", "answer", "category", "image"]
    img = png_b64()
    rows = [{"index": 0, "question": "Q0", "hint": "nan", "A": "red", "B": "blue", "C": "nan", "answer": "A",
             "category": "color", "image": img},
            {"index": 1, "question": "Q1", "hint": "nan", "A": "one", "B": "two", "C": "three", "answer": "C",
             "category": "count", "image": img}]
    tsv = write_tsv(tmp_path / "mmbench_dev.tsv", header, rows)
    prep = formats.prepare("mmbench", tsv, str(tmp_path / "prep"))
    qs = [json.loads(line) for line in open(prep.questions)]
    # 2 options -> 2 copies of Q0, 3 options -> 3 of Q1; copy k has its options rotated k places
    assert sorted(q["question_id"] for q in qs) == [0, 1, 1_000_000, 1_000_001, 2_000_001]
    by_id = {q["question_id"]: q for q in qs}
    assert by_id[1_000_000]["text"] == "Q0\nA. blue\nB. red" + LETTER
    assert by_id[2_000_001]["text"].startswith("Q1\nA. three\nB. one\nC. two")
    assert (tmp_path / "prep" / "images" / by_id[0]["image"]).exists()
    # Q0: right in both copies (A, then B after the rotation); Q1: right twice, wrong in copy 2 (answer there is A)
    answers = [ans(0, "A"), ans(1_000_000, "B. red"), ans(1, "C"), ans(1_000_001, "B"), ans(2_000_001, "C")]
    r = score_answers("mmbench", answers, tsv)
    assert r["score"] == pytest.approx(50.0)                          # Q0 right, Q1 not
    assert r["metrics"]["vanilla_accuracy"] == pytest.approx(100.0)   # both original rows right
    assert r["metrics"]["categories"] == {"color": 100.0, "count": 0.0}


def test_seed_scorer_takes_the_text_as_is(tmp_path):
    data = {"question_type": {"Scene Understanding": 1, "Instance Identity": 2},
            "questions": [{"question_id": "a", "answer": "A", "data_type": "image", "question_type_id": 1,
                           "data_id": "x.jpg", "question": "q", "choice_a": "1", "choice_b": "2", "choice_c": "3",
                           "choice_d": "4"},
                          {"question_id": "b", "answer": "B", "data_type": "image", "question_type_id": 2},
                          {"question_id": "c", "answer": "C", "data_type": "image", "question_type_id": 2},
                          {"question_id": "v", "answer": "D", "data_type": "video", "question_type_id": 2}]}
    path = write_json(tmp_path / "SEED-Bench.json", data)
    r = score_answers("seed", [ans("a", "A"), ans("b", "B "), ans("v", "D")], path)
    # 'B ' != 'B' (no stripping), c unanswered: 1 of 3 image questions; the video one is not scored
    assert r["score"] == pytest.approx(100 / 3)
    assert r["metrics"]["types"] == {"Instance Identity": 0.0, "Scene Understanding": 100.0}
    assert r["unmatched"] == ["v"]


def test_mmmu_scorer(tmp_path):
    recs = [{"id": "validation_Art_1", "question": "Q", "options": "['dog', 'cat']", "answer": "B",
             "question_type": "multiple-choice"},
            {"id": "validation_Art_2", "question": "Q", "options": "[]", "answer": "12", "question_type": "open"},
            {"id": "validation_Math_1", "question": "Q", "options": "[]", "answer": "['0.5', '1/2']",
             "question_type": "open"}]
    path = write_json(tmp_path / "validation.jsonl", recs, lines=True)
    r = score_answers("mmmu", [ans("validation_Art_1", "(B) cat"), ans("validation_Art_2", "the answer is 13"),
                               ans("validation_Math_1", "It equals 1/2")], path)
    assert r["score"] == pytest.approx(200 / 3)
    assert r["metrics"]["subjects"] == {"Art": 50.0, "Math": 100.0}


def test_ocrbench_scorer_counts_right_answers(tmp_path):
    recs = [{"dataset_name": "IIIT5K", "id": 0, "image_path": "a.jpg", "question": "what?", "answers": ["STOP"],
             "type": "Regular Text Recognition"},
            {"dataset_name": "HME100k", "id": 1, "image_path": "b.jpg", "question": "latex?", "answers": "a+b",
             "type": "Handwritten Mathematical Expression Recognition"},
            {"dataset_name": "docVQA", "id": 2, "image_path": "c.jpg", "question": "date?", "answers": ["1999"],
             "type": "Doc-oriented VQA"}]
    path = write_json(tmp_path / "OCRBench.json", recs)
    r = score_answers("ocrbench", [ans(0, "stop sign"), ans(1, "A + b"), ans(2, "in 1999")], path)
    assert r["score"] == 2.0
    assert r["metrics"]["types"]["Handwritten Mathematical Expression Recognition"] == 0


def test_realworldqa_and_vizwiz_scorers(tmp_path):
    rw = write_json(tmp_path / "test.jsonl", [{"question": "q", "answer": "B", "image": "0.png"},
                                              {"question": "q", "answer": "3", "image": "1.png"}], lines=True)
    r = score_answers("realworldqa", [ans(0, "b."), ans(1, "3 cars")], rw)
    assert r["score"] == pytest.approx(50.0)
    ten = lambda a, k: [{"answer": a, "answer_confidence": "yes"}] * k + [  # noqa: E731
        {"answer": "other", "answer_confidence": "yes"}] * (10 - k)
    val = write_json(tmp_path / "val.json", [
        {"image": "VizWiz_val_0.jpg", "question": "q", "answers": ten("unanswerable", 4),
         "answer_type": "unanswerable"},
        {"image": "VizWiz_val_1.jpg", "question": "q", "answers": ten("red", 2), "answer_type": "other"}])
    r = score_answers("vizwiz", [ans("VizWiz_val_0.jpg", "Unanswerable."), ans("VizWiz_val_1.jpg", "Red")], val)
    assert r["score"] == pytest.approx(100 * (1.0 + 0.6) / 2)
    assert r["metrics"]["answer_types"] == {"other": pytest.approx(60.0), "unanswerable": pytest.approx(100.0)}
    from uhd_jax.eval.extra_scoring import vizwiz_submission
    assert vizwiz_submission([ans("VizWiz_val_0.jpg", "Unanswerable."), ans("VizWiz_val_1.jpg", "The Red!")], val) == [
        {"image": "VizWiz_val_0.jpg", "answer": "unanswerable"}, {"image": "VizWiz_val_1.jpg", "answer": "red"}]


def test_hrbench_scorer_averages_cycles(tmp_path):
    header = ["index", "question", "answer", "category", "cycle_category", "A", "B", "C", "D", "image"]
    img = png_b64()
    base = {"question": "q", "A": "a", "B": "b", "C": "c", "D": "d", "image": img}
    rows = [{**base, "index": 0, "answer": "A", "category": "single", "cycle_category": "c0"},
            {**base, "index": 1, "answer": "B", "category": "single", "cycle_category": "c0"},
            {**base, "index": 2, "answer": "C", "category": "single", "cycle_category": "c1"},
            {**base, "index": 3, "answer": "D", "category": "cross", "cycle_category": "c0"}]
    tsv = write_tsv(tmp_path / "hr_bench_4k.tsv", header, rows)
    r = score_answers("hrbench4k", [ans(0, "A"), ans(1, "C"), ans(2, "C"), ans(3, "D.")], tsv)
    # single: cycle c0 1/2 -> 50, c1 1/1 -> 100: FSP 75; cross: 100; overall: c0 2/3, c1 1/1 -> (66.7 + 100) / 2
    assert r["metrics"]["FSP"] == pytest.approx(75.0) and r["metrics"]["FCP"] == pytest.approx(100.0)
    assert r["score"] == pytest.approx((200 / 3 + 100) / 2)
    prep = formats.prepare("hrbench4k", tsv, str(tmp_path / "prep"))
    q = json.loads(open(prep.questions).readline())
    assert q["text"] == "q\nA. a\nB. b\nC. c\nD. d" + HR_LETTER and (tmp_path / "prep" / "images" / q["image"]).exists()


# ---------------------------------------------------------------- parquet and xlsx releases, upload files


def png_bytes(color=(0, 0, 255)):
    return base64.b64decode(png_b64(color))


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), str(path))


def mmmu_row(id_, question_type, answer, options="[]", image=True):
    return {"id": id_, "question": "Q <image 1>", "options": options, "explanation": "", "answer": answer,
            "question_type": question_type, "img_type": "['Diagrams']", "topic_difficulty": "Easy",
            "subfield": "s", "image_1": {"bytes": png_bytes(), "path": "x.png"} if image else None,
            "image_2": None}


def test_mmmu_from_its_parquet_release(tmp_path):
    """MMMU/MMMU as released: a parquet file per subject; the validation split is prepared (first image written
    out), answered and scored; the test split gets MMMU's run_llava.py JSON for the server instead of a score."""
    from uhd_jax.eval import submissions

    root = tmp_path / "MMMU"
    write_parquet(root / "Art" / "validation-00000-of-00001.parquet",
                  [mmmu_row("validation_Art_1", "multiple-choice", "B", "['dog', 'cat', 'cow']"),
                   mmmu_row("validation_Art_2", "open", "12", image=False)])
    write_parquet(root / "Math" / "validation-00000-of-00001.parquet",
                  [mmmu_row("validation_Math_1", "open", "['0.5', '1/2']")])
    write_parquet(root / "Math" / "test-00000-of-00001.parquet", [mmmu_row("test_Math_9", "open", "?")])
    prep = formats.prepare("mmmu", str(root), str(tmp_path / "prep"))
    qs = {q["question_id"]: q for q in map(json.loads, open(prep.questions))}
    assert sorted(qs) == ["validation_Art_1", "validation_Art_2", "validation_Math_1"]   # validation first
    assert qs["validation_Art_1"]["text"] == "Q <image 1>\n(A) dog\n(B) cat\n(C) cow\n" + "\n" + LETTER.lstrip("\n")
    assert Image.open(f"{prep.image_folder}/{qs['validation_Art_1']['image']}").size == (4, 3)
    assert "image" not in qs["validation_Art_2"]
    answers = [ans("validation_Art_1", "The answer is (C)"), ans("validation_Art_2", "12"),
               ans("validation_Math_1", "x = 0.5")]
    r = score_answers("mmmu", answers, prep.annotations)
    # Art: C is wrong, 12 right -> 50; Math: 0.5 read as a number, equal to '0.5' -> 100; overall 2 of 3
    assert r["metrics"]["subjects"] == {"Art": 50.0, "Math": 100.0} and r["score"] == pytest.approx(200 / 3)
    assert not submissions.server_only("mmmu", prep.annotations)
    upload = json.load(open(submissions.write("mmmu", answers, prep.annotations, str(tmp_path / "up"))))
    # multiple choice: the parsed letter; open: the answer text as given (run_llava.py)
    assert upload == {"validation_Art_1": "C", "validation_Art_2": "12", "validation_Math_1": "x = 0.5"}
    for f in root.glob("*/validation-*.parquet"):
        f.unlink()
    test = formats.prepare("mmmu", str(root), str(tmp_path / "test"))
    assert test.annotations.endswith("test.jsonl") and submissions.server_only("mmmu", test.annotations)


def test_realworldqa_from_its_parquet_release(tmp_path):
    write_parquet(tmp_path / "rw" / "data" / "test-00000-of-00001.parquet",
                  [{"image": {"bytes": png_bytes(), "path": None}, "question": "How many cars? ", "answer": "3"},
                   {"image": {"bytes": png_bytes((1, 2, 3)), "path": None}, "question": "Which? A. x", "answer": "A"}])
    prep = formats.prepare("realworldqa", str(tmp_path / "rw"), str(tmp_path / "prep"))
    qs = [json.loads(line) for line in open(prep.questions)]
    assert [(q["question_id"], q["text"]) for q in qs] == [(0, "How many cars?"), (1, "Which? A. x")]
    assert (tmp_path / "prep" / "images" / qs[1]["image"]).exists()
    assert score_answers("realworldqa", [ans(0, "3."), ans(1, "B")], prep.annotations)["score"] == 50.0


MMB_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
              "l2-category", "comment", "split"]


def mmb_rows():
    img = png_b64()
    return [{"index": 0, "question": "Q0", "hint": "nan", "A": "red", "B": "blue", "C": "", "D": "", "answer": "A",
             "category": "color", "image": img, "source": "s", "l2-category": "c", "comment": "", "split": "dev"},
            {"index": 1, "question": "Q1", "hint": "H", "A": "one", "B": "two", "C": "3", "D": "", "answer": "C",
             "category": "count", "image": img, "source": "s", "l2-category": "c", "comment": "", "split": "dev"}]


def write_xlsx(path, header, rows):
    import openpyxl

    book = openpyxl.Workbook()
    book.active.append(header)
    for r in rows:   # numbers as numbers and empty cells empty, as a spreadsheet holds them
        book.active.append([r[h] if r[h] != "" else None for h in header])
    book.save(path)
    return str(path)


def test_mmbench_xlsx_reads_as_its_tsv_and_the_upload_sheet_is_llavas(tmp_path):
    import openpyxl

    from uhd_jax.eval import submissions

    tsv = write_tsv(tmp_path / "dev.tsv", MMB_HEADER, mmb_rows())
    xlsx = write_xlsx(tmp_path / "dev.xlsx", MMB_HEADER, [{**r, "C": 3 if r["C"] == "3" else r["C"]}
                                                          for r in mmb_rows()])
    from_tsv = open(formats.prepare("mmbench", tsv, str(tmp_path / "a")).questions).read()
    assert open(formats.prepare("mmbench", xlsx, str(tmp_path / "b")).questions).read() == from_tsv
    # 2 options -> 2 copies of Q0, 3 -> 3 of Q1 (empty C and D cells are no options); the number 3 reads as '3'
    qs = {q["question_id"]: q["text"] for q in map(json.loads, from_tsv.splitlines())}
    assert sorted(qs) == [0, 1, 1_000_000, 1_000_001, 2_000_001]
    assert qs[1] == "H\nQ1\nA. one\nB. two\nC. 3" + LETTER
    answers = [ans(0, "A"), ans(1_000_000, "B"), ans(1, "C"), ans(1_000_001, "B"), ans(2_000_001, "A. three")]
    assert score_answers("mmbench", answers, xlsx)["score"] == score_answers("mmbench", answers, tsv)["score"] == 100.0
    assert not submissions.server_only("mmbench", xlsx)
    sheet = openpyxl.load_workbook(submissions.write("mmbench", [ans(0, "A"), ans(1_000_000, "B")], tsv,
                                                     str(tmp_path / "up"))).active
    rows = list(sheet.iter_rows(values_only=True))
    # hint, category, image, source, l2-category and comment dropped; 'prediction' the 7th column (before
    # 'answer'); one row per row of the released file, index 1 unanswered; copies are not rows of the file
    assert rows == [("index", "question", "A", "B", "C", "D", "prediction", "answer", "split"),
                    (0, "Q0", "red", "blue", None, None, "A", "A", "dev"),
                    (1, "Q1", "one", "two", "3", None, None, "C", "dev")]
    test_rows = [{k: v for k, v in r.items() if k != "answer"} for r in mmb_rows()]
    test = write_tsv(tmp_path / "test.tsv", [h for h in MMB_HEADER if h != "answer"], test_rows)
    assert submissions.server_only("mmbench", test)


def test_evaluate_writes_upload_files_and_lists_a_test_split(tmp_path, capsys):
    """uhd-evaluate on a split without answers writes the server's file and scores nothing (exit 0)."""
    from uhd_jax.cli.evaluate import main as evaluate

    test = write_json(tmp_path / "test.json", [{"image": "VizWiz_test_0.jpg", "question": "What?"}])
    answers = write_json(tmp_path / "vizwiz.jsonl", [ans("VizWiz_test_0.jpg", "Unanswerable.")], lines=True)
    assert evaluate(["--benchmark", "vizwiz", "--answers", answers, "--annotations", test]) == 0
    out = capsys.readouterr().out
    assert "test split" in out and not (tmp_path / "vizwiz.jsonl.scores.json").exists()
    assert json.load(open(tmp_path / "vizwiz.jsonl.upload" / "answers_upload.json")) == [
        {"image": "VizWiz_test_0.jpg", "answer": "unanswerable"}]
