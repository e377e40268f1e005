"""Evaluation plumbing: the benchmark rules, answer files (format, sharding, resume), question files answered by a
saved checkpoint through the CLI, annotation formats and scoring, the synthetic reading benchmark, the slice picture,
and the bounded number of compilations."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from tests.cli_mistakes import assert_mistake, exit_status
from tests.config_helpers import on_synthetic_data
from tests.file_helpers import write_json
from uhd_jax.eval import answers as answer_files
from uhd_jax.eval import synthetic_bench
from uhd_jax.eval.benchmarks import LETTER, SHORT, eval_rule, prompt_text
from uhd_jax.eval.generate import bucket_length
from uhd_jax.eval.scoring import score_answers, textvqa_question


def test_rules_follow_the_originals_eval_scripts():
    v2 = eval_rule("uhd_v2", "textvqa")
    assert (v2.num_beams, v2.max_slices, v2.pre_resize, v2.pre_resize_upscale_only) == (3, 9, 1536, True)
    assert (eval_rule("uhd_v2", "mme").pre_resize, eval_rule("uhd_v2", "mme").num_beams) == (0, 5)
    assert (eval_rule("uhd_v2", "ai2d").pre_resize, eval_rule("uhd_v2", "docvqa").pre_resize) == (0, 1024)
    v1 = eval_rule("uhd_v1", "mme")
    assert (v1.max_slices, v1.pre_resize, v1.pre_resize_upscale_only, v1.num_beams) == (7, 1024, False, 5)
    assert eval_rule("uhd_v1", "pope").num_beams == 1
    assert (eval_rule("llava15", "textvqa").num_beams, eval_rule("llava15", "textvqa").max_new_tokens) == (1, 128)
    assert eval_rule("slime", "gqa").max_new_tokens == 64
    llavar = eval_rule("llavar", "textvqa")
    assert (llavar.temperature, llavar.max_new_tokens, llavar.image_after_question) == (0.9, 256, True)
    toy = eval_rule("uhd_v2", "textvqa", published_geometry=False)
    assert (toy.max_slices, toy.pre_resize, toy.num_beams) == (0, 0, 3)
    with pytest.raises(ValueError, match="unknown benchmark"):
        eval_rule("uhd_v2", "nocaps")
    # the suffix is added once; the question files that already carry it are left alone
    assert prompt_text("What is it?", v1) == "<image>\nWhat is it?" + SHORT
    assert prompt_text("What is it?" + SHORT, v1) == "<image>\nWhat is it?" + SHORT
    assert prompt_text("Which?\nA. x\nB. y", eval_rule("uhd_v2", "ai2d")).endswith(LETTER)
    assert prompt_text("Q?", llavar) == "Q?\n<image>"


def test_bucket_lengths_bound_padding_and_compilations():
    lengths = list(range(1, 3000))
    buckets = [bucket_length(n) for n in lengths]
    assert all(b >= n for b, n in zip(buckets, lengths))
    assert max(b / n for b, n in zip(buckets, lengths) if n > 64) <= 1.5
    assert len(set(buckets)) <= 13   # 64 .. 3072: two buckets per octave


def test_answer_files_shard_resume_and_survive_a_torn_line(tmp_path):
    qs = [{"question_id": i, "image": f"{i}.png", "text": f"q{i}"} for i in range(10)]
    chunks = [answer_files.chunk(qs, 3, k) for k in range(3)]
    assert [len(c) for c in chunks] == [4, 4, 2] and sum(chunks, []) == qs   # ceil-sized, contiguous, complete
    path = str(tmp_path / "a.jsonl")
    out = answer_files.AnswerFile(path)
    out.write([answer_files.answer_record(q, f"a{q['question_id']}", "m") for q in qs[:3]])
    with open(path, "a") as f:
        f.write('{"question_id": 3, "prompt": "q3", "te')     # a crash mid-line
    again = answer_files.AnswerFile(path)
    assert again.done == {0, 1, 2}
    rec = answer_files.read_answers(path)[0]
    assert set(rec) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert len(rec["answer_id"]) == 22 and rec["prompt"] == "q0" and rec["text"] == "a0"
    with open(path) as f:
        assert f.read().endswith("\n")   # the torn line is gone before anything is appended
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1, "text": "a"}\n{"question_id": 1, "text": "b"}\n')
    with pytest.raises(ValueError, match="q.jsonl:2: question_id 1 appears twice"):
        answer_files.read_questions(str(bad))
    bad.write_text('{"question_id": 1, "text": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="q.jsonl:2: not valid JSON"):
        answer_files.read_questions(str(bad))


@pytest.fixture(scope="module")
def tiny_checkpoint(synthetic_data, tmp_path_factory):
    """A randomly initialised tiny LLaVA-1.5 saved as a checkpoint, with its config."""
    from uhd_jax.models.vlm import init_fn
    from uhd_jax.train.checkpoints import save_params
    from uhd_jax.train.trainer import model_for_stage

    config = on_synthetic_data("configs/llava15.py:tiny", synthetic_data)
    cfg = model_for_stage(config, config.stages.sft)
    params = nn.meta.unbox(jax.jit(init_fn(cfg))(jax.random.PRNGKey(4))["params"])
    directory = str(tmp_path_factory.mktemp("ckpt") / "final")
    save_params(directory, params, {"model": config.model.to_dict()})
    return config, directory


def write_questions(path, images, broken=()):
    lines = [{"question_id": f"q{i}", "image": img, "text": f"What is written on the sign number {i}?"}
             for i, img in enumerate(images)]
    lines += [{"question_id": f"bad{i}", "image": name, "text": "What?"} for i, name in enumerate(broken)]
    with open(path, "w") as f:
        f.writelines(json.dumps(q) + "\n" for q in lines)
    return lines


def test_question_file_answers_resume_and_skip_broken_images(synthetic_data, tiny_checkpoint, tmp_path):
    from uhd_jax.eval.model_vqa import answer_questions, load_model, rule_for, setup

    config, ckpt = tiny_checkpoint
    images = sorted(os.listdir(os.path.join(synthetic_data["images"], "eval")))[:7]
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    folder = str(tmp_path / "imgs")
    os.makedirs(folder)
    for name in images:
        os.symlink(os.path.join(synthetic_data["images"], "eval", name), os.path.join(folder, name))
    os.symlink(tmp_path / "corrupt.png", os.path.join(folder, "corrupt.png"))
    qpath = str(tmp_path / "q.jsonl")
    questions = write_questions(qpath, images, broken=("missing.png", "corrupt.png"))
    model = load_model(config, ckpt)
    answering = setup(model, rule_for(config, "textvqa"), folder, batch_size=4, max_new_tokens=5)
    full = str(tmp_path / "full.jsonl")
    s = answer_questions(answering, questions, full, log=lambda *_: None)
    assert s["answered_now"] == 7 and {x["question_id"] for x in s["skipped"]} == {"bad0", "bad1"}
    reasons = " ".join(x["reason"] for x in s["skipped"])
    assert "missing.png" in reasons and "corrupt.png" in reasons
    # an interrupted run: the first chunk of 3 answered, then the whole file again
    part = str(tmp_path / "part.jsonl")
    answer_questions(answering, questions[:3], part, log=lambda *_: None)
    s2 = answer_questions(answering, questions, part, log=lambda *_: None)
    assert (s2["answered_before"], s2["answered_now"]) == (3, 4)
    by_id = lambda p: {a["question_id"]: a["text"] for a in answer_files.read_answers(p)}  # noqa: E731
    assert by_id(part) == by_id(full) and len(answer_files.read_answers(part)) == 7
    assert s["compilations"] <= 2   # one length bucket, maybe two: never one per question
    # two chunks (two hosts) together answer what one run answers
    halves = [str(tmp_path / f"h{k}.jsonl") for k in range(2)]
    for k in range(2):
        answer_questions(answering, questions, halves[k], num_chunks=2, chunk_index=k, log=lambda *_: None)
    assert {**by_id(halves[0]), **by_id(halves[1])} == by_id(full)
    # a large sampling seed is folded into the key range, not an overflow
    big = answer_questions(answering, questions[:1], str(tmp_path / "big.jsonl"), seed=5000, log=lambda *_: None)
    assert big["answered_now"] == 1


def test_generate_cli_one_image_and_a_question_file(synthetic_data, tiny_checkpoint, tmp_path, capsys):
    from uhd_jax.cli import generate

    config, ckpt = tiny_checkpoint
    image = os.path.join(synthetic_data["images"], "eval", sorted(os.listdir(synthetic_data["images"] + "/eval"))[0])
    common = ["--config", "configs/llava15.py:tiny", "--checkpoint", ckpt, "--data-root", synthetic_data["root"],
              "--tokenizer", synthetic_data["tokenizer"], "--max-new-tokens", "4"]
    assert generate.main(common + ["--image", image, "--prompt", "What does the sign say?"]) == 0
    single = capsys.readouterr().out.rstrip("\n").split("\n")[-1].strip()
    qpath = write_json(tmp_path / "q.jsonl", [{"question_id": "q0", "image": os.path.basename(image),
                                                "text": "What does the sign say?"}], lines=True)
    out = str(tmp_path / "a.jsonl")
    common += ["--image-folder", os.path.dirname(image)]
    assert generate.main(common + ["--questions", qpath, "--answers", out, "--benchmark", "open"]) == 0
    (rec,) = answer_files.read_answers(out)
    run, stage = os.path.split(os.path.dirname(ckpt))   # RUN/STAGE/final -> 'RUN-STAGE', not 'final'
    assert rec["question_id"] == "q0" and rec["model_id"] == f"{os.path.basename(run)}-{stage}"
    assert isinstance(rec["text"], str)
    assert single == rec["text"]


def generate_args(synthetic_data, ckpt):
    return ["--config", "configs/llava15.py:tiny", "--checkpoint", ckpt, "--data-root", synthetic_data["root"],
            "--tokenizer", synthetic_data["tokenizer"], "--max-new-tokens", "4"]


def test_generate_skips_prompts_past_the_model_context(synthetic_data, tiny_checkpoint, tmp_path, capsys):
    """The tiny LLM has 512 positions: with 4 new tokens a prompt may hold 508, and a longer one is skipped with the
    reason, not answered from positions the model never saw."""
    from uhd_jax.cli import generate

    _, ckpt = tiny_checkpoint
    image = sorted(os.listdir(synthetic_data["images"] + "/eval"))[0]
    long_text = "What does the sign say? " + "sign " * 600
    qpath = write_json(tmp_path / "q.jsonl", [{"question_id": "short", "image": image, "text": "What is it?"},
                                               {"question_id": "long", "image": image, "text": long_text}], lines=True)
    out = str(tmp_path / "a.jsonl")
    argv = generate_args(synthetic_data, ckpt) + ["--image-folder", synthetic_data["images"] + "/eval",
                                                  "--questions", qpath, "--answers", out]
    assert generate.main(argv) == 1
    assert [a["question_id"] for a in answer_files.read_answers(out)] == ["short"]
    with open(out + ".skipped.jsonl") as f:
        (skipped,) = [json.loads(line) for line in f]
    assert skipped["question_id"] == "long"
    assert "over the prompt limit of 508 (the model's 512 positions less 4 new tokens)" in skipped["reason"]
    assert "1 skipped (see" in capsys.readouterr().out
    # a limit past the model's positions is refused, not used
    assert exit_status(generate.main, argv + ["--max-prompt-length", "600"]) == 2
    assert "max prompt length 600 is outside 1..508" in capsys.readouterr().err


def fake_checkpoint(path, meta):
    """A checkpoint's config.json alone: every check that names a mismatch runs before the parameters are read."""
    os.makedirs(path)
    write_json(os.path.join(path, "config.json"), meta)
    return str(path)


def test_generate_cli_user_mistakes(synthetic_data, tiny_checkpoint, tmp_path, capsys):
    from uhd_jax.cli.generate import main
    from uhd_jax.config_loading import load_config

    config, ckpt = tiny_checkpoint
    folder = synthetic_data["images"] + "/eval"
    image = os.path.join(folder, sorted(os.listdir(folder))[0])
    ok = generate_args(synthetic_data, ckpt)
    one = ["--image", image, "--prompt", "What?"]
    questions = write_json(tmp_path / "q.jsonl", [{"question_id": 1, "image": os.path.basename(image),
                                                   "text": "What?"}], lines=True)
    qfile = ["--questions", questions, "--answers", str(tmp_path / "a.jsonl"), "--image-folder", folder]

    def replaced(flag, value):
        return [value if i and ok[i - 1] == flag else x for i, x in enumerate(ok)]

    # config typos
    assert_mistake(capsys, main, replaced("--config", "configs/llava51.py:tiny") + one, "'configs/llava51.py' not found")
    assert_mistake(capsys, main, replaced("--config", "configs/llava15.py:tinny") + one,
                   "unknown variant 'tinny'; choose one of")
    # checkpoints: missing, not a checkpoint, another family, another size, a damaged config.json
    assert_mistake(capsys, main, replaced("--checkpoint", str(tmp_path / "nope")) + one, "nope not found; pass a")
    os.makedirs(tmp_path / "empty")
    assert_mistake(capsys, main, replaced("--checkpoint", str(tmp_path / "empty")) + one, "config.json is missing")
    v2 = load_config("configs/uhd_v2.py:tiny")
    other = fake_checkpoint(tmp_path / "v2", {"model": v2.model.to_dict(), "family": "uhd_v2"})
    assert_mistake(capsys, main, replaced("--checkpoint", other) + one, "family is 'uhd_v2' there, 'llava15' in the")
    demo = load_config("configs/llava15.py:demo")
    bigger = fake_checkpoint(tmp_path / "demo", {"model": demo.model.to_dict()})
    assert_mistake(capsys, main, replaced("--checkpoint", bigger) + one,
                   "model.llm.hidden_size is 128 there, 32 in the config; pass the config and variant")
    damaged = fake_checkpoint(tmp_path / "damaged", {})
    with open(os.path.join(damaged, "config.json"), "w") as f:
        f.write('{"model": {\n  "llm": }')
    assert_mistake(capsys, main, replaced("--checkpoint", damaged) + one, "damaged/config.json:2: not valid JSON")
    # tokenizer, image, question and answer files
    assert_mistake(capsys, main, replaced("--tokenizer", str(tmp_path / "tok")) + one, "tok not found")
    assert_mistake(capsys, main, ok + ["--image", str(tmp_path / "x.png"), "--prompt", "What?"], "x.png: not found")
    assert_mistake(capsys, main, ok + ["--image", questions, "--prompt", "What?"], "give a readable image file")
    assert_mistake(capsys, main, ok + qfile[:-1] + [str(tmp_path / "pics")], "--image-folder")
    assert_mistake(capsys, main, ok + ["--questions", str(tmp_path / "q2.jsonl")] + qfile[2:],
                   "q2.jsonl not found")
    (tmp_path / "bad.jsonl").write_text('{"question_id": 1, "text": "a"}\n{"question_id": 2, "text": \n')
    assert_mistake(capsys, main, ok + ["--questions", str(tmp_path / "bad.jsonl")] + qfile[2:],
                   "bad.jsonl:2: not valid JSON")
    (tmp_path / "a.jsonl").write_text('{"question_id": 1, "te\n{"question_id": 2, "text": "b"}\n')
    assert_mistake(capsys, main, ok + qfile, "a.jsonl:1: not valid JSON")
    os.remove(tmp_path / "a.jsonl")
    # flags
    assert_mistake(capsys, main, ok + one + ["--benchmark", "textvq"], "choose from 'ai2d'")
    assert_mistake(capsys, main, ok + qfile + ["--num-chunks", "2", "--chunk-idx", "2"], "outside 0..1")
    assert_mistake(capsys, main, ok + one + ["--num-beams", "2", "--temperature", "0.7"], "beam search with sampling")
    assert_mistake(capsys, main, ok + one + ["--max-new-tokens", "512"], "fill the model's whole context of 512")
    assert not os.path.exists(tmp_path / "a.jsonl")   # nothing was answered on the way


def test_evaluate_cli_user_mistakes(synthetic_data, tiny_checkpoint, tmp_path, capsys):
    from uhd_jax.cli.evaluate import main

    _, ckpt = tiny_checkpoint
    answers = write_json(tmp_path / "a.jsonl", [answer(1, "What?", "two")], lines=True)
    ann = write_json(tmp_path / "v.json", {"annotations": [{"question_id": 1, "answers": [{"answer": "2"}] * 10}]})
    assert exit_status(main, ["--benchmark", "vqav2", "--answers", answers, "--annotations", ann]) == 0
    assert_mistake(capsys, main, ["--benchmark", "vqa2", "--answers", answers, "--annotations", ann],
                   "invalid choice: 'vqa2' (choose from 'ai2d'")
    assert_mistake(capsys, main, ["--benchmark", "vqav2", "--answers", str(tmp_path / "x.jsonl"), "--annotations", ann],
                   "--answers " + str(tmp_path / "x.jsonl") + ": not found")
    (tmp_path / "torn.jsonl").write_text('{"question_id": 1, "text": "a"}\n{"question_id": 2\n{"question_id": 3}\n')
    assert_mistake(capsys, main, ["--benchmark", "vqav2", "--answers", str(tmp_path / "torn.jsonl"), "--annotations",
                                  ann], "torn.jsonl:2: not valid JSON")
    questions = write_json(tmp_path / "q.jsonl", [{"question_id": 1, "image": "1.png"}], lines=True)
    assert_mistake(capsys, main, ["--benchmark", "vqav2", "--answers", questions, "--annotations", ann],
                   "q.jsonl:1: an answer needs 'question_id' and a 'text' string")
    assert_mistake(capsys, main, ["--benchmark", "vqav2", "--answers", answers, "--annotations",
                                  str(tmp_path / "nope.json")], "--annotations " + str(tmp_path / "nope.json"))
    (tmp_path / "broken.json").write_text('{"annotations": [\n  {"question_id": 1,\n  "answers": [}\n]}\n')
    assert_mistake(capsys, main, ["--benchmark", "vqav2", "--answers", answers, "--annotations",
                                  str(tmp_path / "broken.json")], "broken.json:3: neither JSON nor JSON lines")
    (tmp_path / "lines.jsonl").write_text('{"question_id": 1, "answer": "a"}\n{"question_id": 2, "answer": \n')
    assert_mistake(capsys, main, ["--benchmark", "docvqa", "--answers", answers, "--annotations",
                                  str(tmp_path / "lines.jsonl")], "lines.jsonl:2: neither JSON nor JSON lines")
    other = write_json(tmp_path / "gqa.json", {"201": {"answer": "left"}})
    assert_mistake(capsys, main, ["--benchmark", "gqa", "--answers", answers, "--annotations", other],
                   "none of the 1 answers matches an annotation")
    assert_mistake(capsys, main, ["--benchmark", "textvqa", "--answers", answers], "give --answers and --annotations")
    # the reading benchmark checks every model before it renders or answers anything
    reading = ["--benchmark", "synthetic_reading", "--workdir", str(tmp_path / "reading"), "--data-root",
               synthetic_data["root"], "--tokenizer", synthetic_data["tokenizer"]]
    assert_mistake(capsys, main, reading + ["--config", "configs/llava15.py:tiny"], "needs --checkpoint once per model")
    assert_mistake(capsys, main, reading + ["--config", "configs/llava15.py:tiny", "--checkpoint", ckpt, "--checkpoint",
                                            ckpt], "with --config: one per --checkpoint, in pairs")
    assert_mistake(capsys, main, reading + ["--config", "configs/llava15.py:tiny", "--checkpoint", ckpt, "--config",
                                            "configs/uhd_v2.py:tiny", "--checkpoint", ckpt],
                   "model.projector_type is 'mlp2x_gelu' there, 'adapt_spatial_resampler_v2' in the config")
    assert not os.path.exists(tmp_path / "reading")


def test_show_slices_cli_user_mistakes(tmp_path, capsys):
    from uhd_jax.cli.show_slices import main

    image = tmp_path / "sq.png"
    Image.new("RGB", (64, 48)).save(image)
    (tmp_path / "notes.png").write_text("not an image")
    ok = ["--image", str(image), "--config", "configs/uhd_v2.py:tiny", "--out", str(tmp_path / "out" / "s.png")]
    assert exit_status(main, ok + ["--config.data.slicing.max_slices=2"]) == 0
    assert exit_status(main, ok[1:]) == 0   # the positional image of earlier versions
    assert_mistake(capsys, main, ok[2:], "give the image once: --image IMAGE")
    assert_mistake(capsys, main, ok + [str(image)], "give the image once")
    assert_mistake(capsys, main, ["--image", str(tmp_path / "x.png")] + ok[2:], "x.png: not found")
    assert_mistake(capsys, main, ["--image", str(tmp_path / "notes.png")] + ok[2:], "notes.png cannot be read")
    assert_mistake(capsys, main, ok[:3] + ["configs/uhd_v3.py"] + ok[4:], "'configs/uhd_v3.py' not found")
    assert_mistake(capsys, main, ok[:3] + ["configs/uhd_v2.py:8b"] + ok[4:], "unknown variant '8b'")
    assert_mistake(capsys, main, ok + ["--config.data.slicing.max_slice=2"],
                   "unknown config key 'max_slice'; config.data.slicing has [")
    assert_mistake(capsys, main, ok + ["--config.data.slicing.max_slices=many"], "not a valid int")
    assert_mistake(capsys, main, ok + ["--benchmark", "docvq"], "invalid choice: 'docvq'")
    assert_mistake(capsys, main, ok + ["--display", "0"], "--display 0")


def test_a_mistake_run_from_the_shell_is_one_line_and_status_2(tmp_path):
    import subprocess
    import sys

    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    r = subprocess.run([sys.executable, "launch/generate.py", "--config", "configs/nope.py", "--checkpoint", "ckpt",
                        "--image", str(image), "--prompt", "What?"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    package = os.path.join(os.getcwd(), "uhd_jax")
    assert r.stderr.strip().splitlines()[-1] == (f"generate.py: error: --config configs/nope.py: config file "
                                                 f"'configs/nope.py' not found in {os.getcwd()} or under the "
                                                 f"installed package ({package}) (expected e.g. configs/llava15.py:7b)")


def test_checkpoint_that_does_not_fit_is_named(tiny_checkpoint, tmp_path):
    from uhd_jax.eval.model_vqa import load_model
    from uhd_jax.train.checkpoints import load_params, save_params

    config, ckpt = tiny_checkpoint
    params = load_params(ckpt)
    params["projector"] = {k: v for k, v in params["projector"].items() if k != "dense_1"}
    model = dict(config.model.to_dict())
    save_params(str(tmp_path / "broken"), params, {"model": model})
    with pytest.raises(ValueError, match=r"missing \['projector/dense_1"):
        load_model(config, str(tmp_path / "broken"))


@pytest.fixture(scope="module")
def trained_layout(synthetic_data, tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint as training leaves it: WORK/runs/tiny/sft/final, whose config.json records the family,
    the stage and the tokenizer relative to WORK, the directory training ran in (WORK/data/tokenizer)."""
    import shutil

    config, ckpt = tiny_checkpoint
    work = tmp_path_factory.mktemp("work")
    final = work / "runs" / "tiny" / "sft" / "final"
    shutil.copytree(ckpt, final)
    os.makedirs(work / "data")
    os.symlink(synthetic_data["tokenizer"], work / "data" / "tokenizer")
    write_json(final / "config.json", {"model": config.model.to_dict(), "family": "llava15", "stage": "sft",
                                       "steps": 1, "tokenizer": "data/tokenizer"})
    return str(final)


def test_generate_needs_only_the_checkpoint(synthetic_data, trained_layout, tmp_path, capsys, monkeypatch):
    """--checkpoint alone: model, family and tokenizer from its config.json (the tokenizer found under the directory
    training ran in), prompt format and slicing from the family's config in the variant of its sizes, found from any
    directory. The answers are those of --config with --tokenizer; the answer file names the run and stage."""
    from uhd_jax.cli import generate

    folder = synthetic_data["images"] + "/eval"
    qpath = str(tmp_path / "q.jsonl")
    write_questions(qpath, sorted(os.listdir(folder))[:3])
    monkeypatch.chdir(tmp_path)   # neither the repository nor the training directory
    common = ["--checkpoint", trained_layout, "--questions", qpath, "--image-folder", folder, "--max-new-tokens", "4"]
    assert generate.main(common + ["--answers", "alone.jsonl"]) == 0
    assert generate.main(common + ["--answers", "given.jsonl", "--config", "configs/llava15.py:tiny", "--tokenizer",
                                   synthetic_data["tokenizer"], "--model-id", "mine",
                                   "--config.model.remat_policy=none"]) == 0   # a run setting: accepted
    alone, given = answer_files.read_answers("alone.jsonl"), answer_files.read_answers("given.jsonl")
    assert len(alone) == 3 and [a["text"] for a in alone] == [a["text"] for a in given]
    assert {a["model_id"] for a in alone} == {"tiny-sft"} and {a["model_id"] for a in given} == {"mine"}


def test_run_settings_of_a_checkpoint_can_change_and_its_model_cannot(synthetic_data, tiny_checkpoint,
                                                                      trained_layout):
    """A checkpoint converted or trained on CPU runs with cuDNN attention, bfloat16 weights or scanned layers on
    another machine: those are run settings. Its sizes and anything else it computes with are not."""
    import jax.numpy as jnp

    from uhd_jax.cli_errors import UserError
    from uhd_jax.eval.checkpoint_config import checkpoint_name, choose_tokenizer, experiment
    from uhd_jax.eval.model_vqa import load_model
    from uhd_jax.train.checkpoints import load_params

    src = experiment(trained_layout, None, ["model.attention_impl=cudnn", "model.param_dtype=bfloat16",
                                            "model.scan_layers=true", "model.dtype=bfloat16"])
    assert src.config.variant == "tiny" and src.meta["model"]["attention_impl"] == "auto"
    assert os.path.samefile(choose_tokenizer(src), synthetic_data["tokenizer"])   # WORK/data/tokenizer
    model = load_model(src.config, trained_layout, model=src.model, model_id=src.model_id)
    assert model.cfg.llm.attention_impl == model.cfg.vision.attention_impl == "cudnn"
    assert model.cfg.llm.dtype == model.cfg.vision.dtype == jnp.bfloat16
    assert model.cfg.llm.scan_layers and model.model_id == "tiny-sft" == checkpoint_name(trained_layout)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(model.params))
    stored = load_params(trained_layout)["llm"]
    q = model.params["llm"]["layers"]["attn"]["q"]["kernel"]   # the two layers stacked in order
    np.testing.assert_array_equal(np.asarray(q[1], np.float32), np.asarray(
        jnp.asarray(stored["layers_1"]["attn"]["q"]["kernel"]).astype(jnp.bfloat16), np.float32))
    for item, field in (("model.llm.num_layers=3", "model.llm.num_layers is 2"),
                        ("model.llm.rope_theta=500000.0", "model.llm.rope_theta is 10000.0"),
                        ("model.vision.select_layer=-1", "model.vision.select_layer is -2")):
        with pytest.raises(UserError, match=f"--config.{item}: the checkpoint's {field} .*only the run settings"):
            experiment(trained_layout, None, [item])
    _, ckpt = tiny_checkpoint
    assert experiment(ckpt, "configs/llava15.py:tiny", ["model.llm.rope_theta=10000.0"]).model == \
        experiment(ckpt, "configs/llava15.py:tiny").model   # the checkpoint's own value is no change


def test_checkpoint_alone_user_mistakes(synthetic_data, tiny_checkpoint, trained_layout, tmp_path, capsys):
    from uhd_jax.cli.generate import main
    from uhd_jax.config_loading import load_config

    config, _ = tiny_checkpoint
    folder = synthetic_data["images"] + "/eval"
    one = ["--image", os.path.join(folder, sorted(os.listdir(folder))[0]), "--prompt", "What?"]
    ok = ["--checkpoint", trained_layout] + one
    assert_mistake(capsys, main, ok + ["--config.model.llm.num_layers=3"],
                   "--config.model.llm.num_layers=3: the checkpoint's model.llm.num_layers is 2 (")
    assert_mistake(capsys, main, ok + ["--config.model.attention_impl=cudnn"],
                   "'cudnn', which needs an NVIDIA GPU, and JAX runs on cpu here; pass "
                   "--config.model.attention_impl=xla")
    assert_mistake(capsys, main, ok + ["--config.model.dtype=float64"], "unknown dtype 'float64'")
    assert_mistake(capsys, main, ok + ["--config.model.atention_impl=xla"], "unknown config key 'atention_impl'")
    assert_mistake(capsys, main, ok + ["--config", "configs/llava15.py:demo"],
                   "model.llm.hidden_size is 32 there, 128 in the config")
    model = config.model.to_dict()
    no_family = fake_checkpoint(tmp_path / "hf", {"model": model})
    assert_mistake(capsys, main, ["--checkpoint", no_family] + one,
                   f"{no_family}/config.json records no 'family' (a converted LLM or vision tower alone?); pass "
                   f"--config")
    deeper = fake_checkpoint(tmp_path / "deeper", {"model": dict(model, llm=dict(model["llm"], num_layers=3)),
                                                   "family": "llava15"})
    assert_mistake(capsys, main, ["--checkpoint", deeper] + one, "its model fits no variant (e.g. '13b': model.llm.")
    moved = fake_checkpoint(tmp_path / "moved", {"model": model, "family": "llava15", "tokenizer": "data/tokenizer"})
    assert_mistake(capsys, main, ["--checkpoint", moved] + one,
                   "moved/config.json records tokenizer 'data/tokenizer', which is neither in")
    converted = fake_checkpoint(tmp_path / "converted", {"model": model, "family": "llava15"})
    assert_mistake(capsys, main, ["--checkpoint", converted] + one,
                   "converted/config.json records no 'tokenizer', and the config's synthetic/tokenizer is not a "
                   "directory; pass --tokenizer DIR")
    v2 = load_config("configs/uhd_v2.py:tiny").model.to_dict()
    assert_mistake(capsys, main, ["--checkpoint", fake_checkpoint(tmp_path / "v2", {"model": v2, "family": "uhd_v2",
                                                                                    "variant": "tinny"})] + one,
                   "v2/config.json records variant 'tinny', which ")


def test_reading_benchmark_and_slice_picture_from_a_checkpoint_alone(synthetic_data, trained_layout, tmp_path):
    from uhd_jax.cli.evaluate import main as evaluate
    from uhd_jax.cli.show_slices import main as show_slices
    from uhd_jax.config_loading import load_config

    work = str(tmp_path / "reading")
    assert evaluate(["--benchmark", "synthetic_reading", "--checkpoint", trained_layout, "--workdir", work,
                     "--per-bucket", "2", "--sides", "112", "--max-new-tokens", "2"]) == 0
    with open(os.path.join(work, "results.json")) as f:
        assert json.load(f)["tiny-sft"]["buckets"]["112"]["n"] == 2
    assert {a["model_id"] for a in answer_files.read_answers(os.path.join(work, "answers_tiny-sft.jsonl"))} == \
        {"tiny-sft"}
    # the slice picture of a UHD checkpoint is the one of its config
    v2 = load_config("configs/uhd_v2.py:tiny")
    ckpt = fake_checkpoint(tmp_path / "v2" / "sft" / "final", {"model": v2.model.to_dict(), "family": "uhd_v2"})
    image = str(tmp_path / "wide.png")
    Image.new("RGB", (300, 120)).save(image)
    outs = [str(tmp_path / f"{k}.png") for k in range(2)]
    assert show_slices(["--image", image, "--checkpoint", ckpt, "--out", outs[0]]) == 0
    assert show_slices([image, "--config", "configs/uhd_v2.py:tiny", "--out", outs[1]]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(outs[0])), np.asarray(Image.open(outs[1])))


def answer(qid, prompt, text):
    return {"question_id": qid, "prompt": prompt, "text": text}


def test_textvqa_scoring_matches_annotations_as_llava_does(tmp_path):
    ann = write_json(tmp_path / "TextVQA_0.5.1_val.json", {"data": [
        {"image_id": "img1", "question": "What brand is it?", "answers": ["coca cola"] * 3 + ["pepsi"] * 7},
        {"image_id": "img2", "question": "What year?", "answers": ["1984"] * 10}]})
    prompts = ["What brand is it?\nReference OCR token: COCA, Cola\n" + SHORT.strip(), "What year?" + SHORT]
    result = score_answers("textvqa", [answer("img1", prompts[0], "Coca Cola."), answer("img2", prompts[1], "1985")],
                           ann)
    assert result["scored"] == 2 and result["score"] == pytest.approx(100 * (0.9 + 0) / 2)
    assert textvqa_question("Reference OCR token: A\nWhy?\nAnswer") == "why?"


def test_vqav2_gqa_docvqa_chartqa_ai2d_formats(tmp_path):
    vqa = write_json(tmp_path / "v.json", {"annotations": [{"question_id": 5, "answers": [{"answer": "two"}] * 10}]})
    assert score_answers("vqav2", [answer(5, "", "2")], vqa)["score"] == 100.0   # number words -> digits
    gqa = write_json(tmp_path / "testdev_balanced_questions.json", {"201": {"answer": "left"}, "202": {"answer": "no"}})
    r = score_answers("gqa", [answer("201", "", "Left."), answer("202", "", "yes"), answer("999", "", "x")], gqa)
    assert (r["score"], r["scored"], r["unmatched_count"]) == (50.0, 2, 1)
    doc = write_json(tmp_path / "doc.jsonl", [{"question_id": 1, "answer": "Invoice"}], lines=True)
    assert score_answers("docvqa", [answer(1, "", "invoices")], doc)["score"] == pytest.approx(100 * (1 - 1 / 8))
    chart = write_json(tmp_path / "c.jsonl", [{"question_id": 1, "answer": "3,000"}], lines=True)
    assert score_answers("chartqa", [answer(1, "", "3000")], chart)["score"] == 100.0
    ai2d = write_json(tmp_path / "a.jsonl", [{"question_id": 1, "answer": "B"}, {"question_id": 2, "answer": "C"}],
                      lines=True)
    assert score_answers("ai2d", [answer(1, "", " b "), answer(2, "", "C.")], ai2d)["score"] == 50.0


def test_pope_per_category_and_mme_from_its_release_folder(tmp_path):
    pope = write_json(tmp_path / "pope.jsonl", [
        {"question_id": 1, "label": "yes", "category": "random"},
        {"question_id": 2, "label": "no", "category": "random"},
        {"question_id": 3, "label": "yes", "category": "popular"}, {"question_id": 4, "label": "no",
                                                                     "category": "popular"}], lines=True)
    r = score_answers("pope", [answer(1, "", "Yes, there is."), answer(2, "", "No."), answer(3, "", "There is not."),
                               answer(4, "", "No")], pope)
    assert r["metrics"]["random"]["f1"] == 1.0 and r["metrics"]["popular"]["TP"] == 0
    assert r["metrics"]["accuracy"] == pytest.approx(75.0)
    mme = tmp_path / "MME"
    (mme / "OCR").mkdir(parents=True)
    (mme / "OCR" / "0001.txt").write_text("Is the word STOP? Please answer yes or no.\tYes\n"
                                          "Is the word GO? Please answer yes or no.\tNo\n")
    (mme / "count" / "questions_answers_YN").mkdir(parents=True)
    (mme / "count" / "questions_answers_YN" / "7.txt").write_text(
        "Are there two dogs?  Please answer yes or no.\tYes\nAre there three dogs?  Please answer yes or no.\tNo\n")
    answers = [answer("OCR/0001.jpg", "Is the word STOP?" + SHORT, "Yes"),
               answer("OCR/0001.jpg", "Is the word GO?" + SHORT, "No"),
               answer("count/7.jpg", "Are there two dogs?" + SHORT, "yes, two"),
               answer("count/7.jpg", "Are there three dogs?" + SHORT, "Yes")]
    r = score_answers("mme", answers, str(mme))
    assert r["scored"] == 4
    assert r["metrics"]["OCR"] == 200.0 and r["metrics"]["count"] == 50.0 and r["score"] == 250.0


def test_synthetic_reading_benchmark_buckets_and_scores(tmp_path):
    paths = synthetic_bench.build(str(tmp_path / "bench"), per_bucket=3, sides=(336, 1024))
    questions = answer_files.read_questions(paths["questions"])
    assert len(questions) == 6
    for q in questions:
        img = Image.open(os.path.join(paths["images"], q["image"]))
        assert max(img.size) == q["bucket"] and q["text"].split("\n")[0] in synthetic_bench.READING_QUESTIONS
    with open(paths["annotations"]) as f:
        refs = {a["question_id"]: a["answer"] for a in json.load(f)["annotations"]}
    right = [answer(q["question_id"], q["text"], refs[q["question_id"]] + ".") for q in questions]
    wrong = [dict(a, text="zzz") if a["question_id"].startswith("1024") else a for a in right]
    r = synthetic_bench.score(wrong, paths["annotations"])
    assert r["buckets"][336]["exact"] == 100.0 and r["buckets"][1024]["exact"] == 0.0 and r["missing"] == 0
    assert r["overall"]["exact"] == 50.0 and r["buckets"][336]["vqa"] == 100.0
    png = synthetic_bench.bar_chart({"a": r, "b": synthetic_bench.score(right, paths["annotations"])},
                                    str(tmp_path / "chart.png"))
    assert Image.open(png).size == (120 + 110 * 2, 420)
    assert synthetic_bench.build(str(tmp_path / "bench"), per_bucket=3, sides=(336, 1024)) == paths   # cached


def test_slice_picture_shows_the_spec_worked_example(tmp_path):
    """uhd.md §1.2: at evaluation v1 resizes a 336x336 image to 1024x1024 and slices it 3x2: 1014 tokens."""
    from uhd_jax.cli.show_slices import main, picture_size, slice_plan
    from uhd_jax.config_loading import load_config

    image = Image.new("RGB", (336, 336), (200, 120, 40))
    plan = slice_plan(image, load_config("configs/uhd_v1.py"), "textvqa")
    assert plan["input_size"] == (1024, 1024) and plan["grid"] == (3, 2) and plan["tokens"] == 1014
    assert len(plan["cells"]) == 6 and plan["overview"].size == (336, 336)
    path = str(tmp_path / "sq.png")
    image.save(path)
    out = str(tmp_path / "slices.png")
    assert main([path, "--config", "configs/uhd_v1.py", "--out", out, "--display", "600"]) == 0
    assert Image.open(out).size == picture_size((336, 336), (336, 336), 600) == (3 * 16 + 600 + 336, 40 + 600 + 16)
    wide = Image.new("RGB", (1318, 454))
    slime = slice_plan(wide, load_config("configs/slime.py"))
    assert slime["grid"] == (3, 2) and slime["tokens"] == 576 + 1 + 6 * 144   # spec C.1/C.5
    fixed = slice_plan(wide, load_config("configs/llava15.py"))
    assert fixed["grid"] is None and fixed["tokens"] == 576 and fixed["canvas"].size == (1318, 1318)
    assert np.asarray(fixed["canvas"])[0, 0].tolist() == [122, 116, 104]   # LLaVA's pad colour


def test_slime_answers_do_not_depend_on_the_batch_while_the_router_drops_tokens(synthetic_data):
    """SliME's router turns image slots invalid per sample: the decoder must see each row's own routed mask."""
    import jax.numpy as jnp

    from uhd_jax.data.dataset import read_samples
    from uhd_jax.data.pipeline import Source
    from uhd_jax.eval.decoding import GenerationConfig
    from uhd_jax.eval.generate import Generator, left_pad
    from uhd_jax.models.vlm import VLM, init_fn
    from uhd_jax.train.trainer import model_for_stage, preparer_factory

    c = on_synthetic_data("configs/slime.py:tiny", synthetic_data)
    cfg = model_for_stage(c, c.stages.sft)
    params = nn.meta.unbox(jax.jit(init_fn(cfg))(jax.random.PRNGKey(2))["params"])
    prep = preparer_factory(c, c.stages.sft, cfg)(Source(synthetic_data["eval"]["sft"], synthetic_data["images"]))
    prompts = [prep.prompt(s) for s in read_samples(synthetic_data["eval"]["sft"])[:3]]
    length = max(len(p["ids"]) for p in prompts)
    gen = GenerationConfig(max_new_tokens=4)
    together = Generator(cfg, params, prep.tokenizer, gen, batch_size=3, smallest_bucket=length).token_ids(prompts)
    for p, t in zip(prompts, together):
        alone = Generator(cfg, params, prep.tokenizer, gen, batch_size=1, smallest_bucket=length).token_ids([p])[0]
        np.testing.assert_array_equal(alone, t)
    ids, valid, image_map, pixels = left_pad(prompts, length, cfg.views_per_image, cfg.vision.image_size)
    _, routed, _ = VLM(cfg).apply({"params": params}, jnp.asarray(ids), jnp.asarray(valid), jnp.zeros_like(ids),
                                  jnp.asarray(pixels), jnp.asarray(image_map), method=VLM.embed_image_and_text)
    assert int(routed.sum()) < int(valid.sum()), "the router kept every token: the routed mask went untested"
