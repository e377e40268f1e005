"""Paper-table suites: a data root holding only some benchmarks is planned, the missing ones are listed, the present
ones scored from their answer files, and the table printed in the paper's column order beside the published numbers."""
import json

import pytest

from tests.cli_mistakes import assert_mistake
from uhd_jax.cli.evaluate import main as evaluate
from uhd_jax.eval import suites


def write(path, data, lines=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in data) if lines else json.dumps(data))


@pytest.fixture()
def partial_root(tmp_path):
    """ScienceQA, SEED and MM-Vet released files; nothing else."""
    root = tmp_path / "eval"
    sqa = root / "scienceqa"
    write(sqa / "llava_test_CQM-A.json", [
        {"id": "1", "image": "1/image.png",
         "conversations": [{"from": "human", "value": "<image>\nContext: N/A\nQuestion: Q1?\nOptions: (A) x (B) y"}]},
        {"id": "2",
         "conversations": [{"from": "human", "value": "Context: N/A\nQuestion: Q2?\nOptions: (A) x (B) y"}]}])
    write(sqa / "problems.json", {"1": {"choices": ["x", "y"], "answer": 1, "image": "image.png"},
                                  "2": {"choices": ["x", "y"], "answer": 0, "image": None}})
    write(sqa / "pid_splits.json", {"test": ["1", "2"]})
    (sqa / "images" / "test").mkdir(parents=True)
    write(root / "seed_bench" / "SEED-Bench.json", {"question_type": {"Scene": 1}, "questions": [
        {"question_id": "s0", "answer": "A", "data_type": "image", "question_type_id": 1, "data_id": "0.jpg",
         "question": "Q?", "choice_a": "a", "choice_b": "b", "choice_c": "c", "choice_d": "d"},
        {"question_id": "s1", "answer": "C", "data_type": "image", "question_type_id": 1, "data_id": "1.jpg",
         "question": "Q?", "choice_a": "a", "choice_b": "b", "choice_c": "c", "choice_d": "d"}]})
    (root / "seed_bench" / "SEED-Bench-image").mkdir()
    write(root / "mm-vet" / "mm-vet.json", {"v1_0": {"imagename": "v1_0.png", "question": "Q?", "answer": "a",
                                                     "capability": ["rec"]}})
    (root / "mm-vet" / "images").mkdir()
    write(root / "vizwiz" / "test.json", [{"image": "VizWiz_test_0.jpg", "question": "What?"}])
    (root / "vizwiz" / "test").mkdir()
    return root


def test_plan_lists_what_is_missing(partial_root):
    present, missing = suites.plan("llava15", str(partial_root))
    assert present == [("VizWiz", "vizwiz"), ("SQA-IMG", "scienceqa"), ("SEED", "seed"), ("MM-Vet", "mmvet")]
    assert set(missing) == {"vqav2", "gqa", "textvqa", "pope", "mme", "mmbench", "mmbench_cn", "llava_bench"}
    assert missing["gqa"] == "gqa/llava_gqa_testdev_balanced.jsonl"


def test_suite_scores_answer_files_and_prints_the_table(partial_root, tmp_path, capsys):
    work = tmp_path / "work"
    # answers as uhd-generate writes them, where the suite looks for them
    write(work / "scienceqa" / "answers.jsonl", [{"question_id": "1", "prompt": "", "text": "B"},
                                                 {"question_id": "2", "prompt": "", "text": "B"}], lines=True)
    write(work / "seed" / "answers.jsonl", [{"question_id": "s0", "prompt": "", "text": "A"},
                                            {"question_id": "s1", "prompt": "", "text": "D"}], lines=True)
    write(work / "mmvet" / "answers.jsonl", [{"question_id": "v1_0", "prompt": "", "text": "a"}], lines=True)
    write(work / "vizwiz" / "answers.jsonl", [{"question_id": "VizWiz_test_0.jpg", "prompt": "",
                                               "text": "Unanswerable."}], lines=True)
    assert evaluate(["--suite", "llava15", "--bench-root", str(partial_root), "--workdir", str(work)]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "VQAv2" in line)
    assert header.split() == ["VQAv2", "GQA", "VizWiz", "SQA-IMG", "TextVQA", "POPE", "MME", "MMB", "MMB-CN", "SEED",
                              "LLaVA-W", "MM-Vet"]
    # SQA-IMG: problem 1 (the image one) right -> 100; SEED: 1 of 2 -> 50; the rest '-'
    run = next(line for line in out.splitlines() if line.startswith("this run")).split()[2:]
    assert run == ["-", "-", "-", "100.0", "-", "-", "-", "-", "-", "50.0", "-", "-"]
    assert next(line for line in out.splitlines() if line.startswith("LLaVA-1.5-7B")).split()[1:4] == [
        "78.5", "62.0", "50.0"]
    assert "missing under" in out and "gqa/llava_gqa_testdev_balanced.jsonl" in out
    assert "mmvet" in out and "--judge-url" in out            # judged, not scored without an endpoint
    questions = [json.loads(line) for line in open(work / "scienceqa" / "questions.jsonl")]
    assert questions[0]["text"] == ("Context: N/A\nQuestion: Q1?\nOptions: (A) x (B) y\n"
                                    "Answer with the option's letter from the given choices directly.")
    assert "image" not in questions[1]
    saved = json.load(open(work / "suite_llava15.json"))
    assert saved["scores"] == {"scienceqa": 100.0, "seed": 50.0}
    assert json.load(open(work / "mmvet" / "mmvet_submission.json")) == {"v1_0": "a"}
    assert [json.loads(line) for line in open(work / "seed" / "answers_upload.jsonl")] == [
        {"question_id": "s0", "prediction": "A"}, {"question_id": "s1", "prediction": "D"}]
    # VizWiz's test split has no answers: the EvalAI upload file is written instead of a score
    assert json.load(open(work / "vizwiz" / "answers_upload.json")) == [
        {"image": "VizWiz_test_0.jpg", "answer": "unanswerable"}]
    assert "upload" in out
    assert json.loads(open(work / "vizwiz" / "questions.jsonl").readline())["text"].endswith("'Unanswerable'.\n"
                                                                                           "Answer the question using "
                                                                                           "a single word or phrase.")


def test_suite_mistakes(partial_root, tmp_path, capsys):
    assert_mistake(capsys, evaluate, ["--suite", "llava15", "--workdir", tmp_path], "give --bench-root")
    assert_mistake(capsys, evaluate, ["--suite", "llava15", "--bench-root", tmp_path / "nope"], "not a directory")
    assert_mistake(capsys, evaluate, ["--suite", "llava15", "--benchmark", "gqa"], "either --benchmark")


def test_single_benchmark_scoring_of_an_added_benchmark(partial_root, tmp_path, capsys):
    answers = tmp_path / "sqa.jsonl"
    write(answers, [{"question_id": "1", "prompt": "", "text": "The answer is B."}], lines=True)
    assert evaluate(["--benchmark", "scienceqa", "--answers", str(answers),
                     "--annotations", str(partial_root / "scienceqa")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("scienceqa: 100.00") and "accuracy" in out   # problem 2 unanswered: accuracy 50
    assert json.load(open(str(answers) + ".scores.json"))["metrics"]["accuracy"] == 50.0


def test_suite_answers_each_present_benchmark_with_its_prepared_questions(partial_root, tmp_path):
    """The generation side: the answerer is called once per present benchmark with the converted question file and
    the benchmark's image folder (the CLI's answerer is uhd-generate's, loaded once)."""
    calls = []

    def answer(bench, questions, images, answers_path):
        calls.append((bench, questions, images))
        qs = [json.loads(line) for line in open(questions)]
        reply = {"scienceqa": "A", "seed": "A", "vizwiz": "red", "mmvet": "a"}[bench]
        write(tmp_path / "work" / bench / "answers.jsonl",
              [{"question_id": q["question_id"], "prompt": q["text"], "text": reply} for q in qs], lines=True)

    outcome = suites.run("llava15", str(partial_root), str(tmp_path / "work"), answer=answer, log=lambda *_: None)
    assert [c[0] for c in calls] == ["vizwiz", "scienceqa", "seed", "mmvet"]
    assert calls[2][1] == str(tmp_path / "work" / "seed" / "questions.jsonl")
    assert calls[2][2] == str(partial_root / "seed_bench" / "SEED-Bench-image")
    assert calls[1][2] == str(partial_root / "scienceqa" / "images" / "test")
    # 'A' everywhere: ScienceQA problem 1 (image, answer B) wrong, problem 2 (text) right; SEED s0 right, s1 wrong
    assert outcome["scores"] == {"scienceqa": 0.0, "seed": 50.0}
    assert outcome["results"]["scienceqa"]["metrics"]["accuracy"] == 50.0


def test_prepare_converts_a_released_file_for_uhd_generate(partial_root, tmp_path, capsys):
    out = tmp_path / "prep"
    assert evaluate(["--benchmark", "seed", "--prepare", str(partial_root / "seed_bench"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"questions -> {out / 'questions.jsonl'}" in printed and "uhd-generate --benchmark seed" in printed
    assert [json.loads(line)["question_id"] for line in open(out / "questions.jsonl")] == ["s0", "s1"]
    assert_mistake(capsys, evaluate, ["--benchmark", "gqa", "--prepare", str(tmp_path)], "no reader for 'gqa'")


def test_suite_lists_a_test_split_with_its_upload_file(tmp_path, capsys):
    """MMMU released as parquet with only its test split: the suite answers it, writes MMMU's JSON for the server
    and lists it as not scored; the table still prints."""
    from tests.test_benchmarks_extra import mmmu_row, write_parquet

    root = tmp_path / "eval"
    write_parquet(root / "MMMU" / "Art" / "test-00000-of-00001.parquet",
                  [mmmu_row("test_Art_1", "multiple-choice", "?", "['dog', 'cat']"),
                   mmmu_row("test_Art_2", "open", "?")])

    def answer(bench, questions, images, answers_path):
        qs = [json.loads(line) for line in open(questions)]
        write(tmp_path / "work" / bench / "answers.jsonl",
              [{"question_id": q["question_id"], "prompt": q["text"], "text": "(B) cat"} for q in qs], lines=True)

    outcome = suites.run("uhd_v1", str(root), str(tmp_path / "work"), answer=answer, log=lambda *_: None)
    assert outcome["scores"] == {} and "mmmu" not in outcome["missing"]
    assert outcome["skipped"]["mmmu"].startswith("test split: upload")
    assert json.load(open(tmp_path / "work" / "mmmu" / "answers_upload.json")) == {"test_Art_1": "B",
                                                                                   "test_Art_2": "(B) cat"}
    printed = suites.report("uhd_v1", outcome, str(root))
    assert "LLaVA-UHD-13B" in printed and "MMMU" in printed and "not scored" in printed
