"""Our models in lmms-eval (`--model uhd_jax`), offline on a tiny random LLaVA-1.5: the harness answers the synthetic
reading benchmark word for word as `uhd-evaluate --benchmark synthetic_reading`, its continuation log-likelihoods
are those of one unpadded forward, and, where lmms-eval is installed (the `lmms` extra plus `pip install --no-deps
lmms-eval==0.7.3`), lmms-eval finds the model through its entry point and scores local tasks over the same questions
with the same numbers."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.config_helpers import on_synthetic_data
from uhd_jax.integrations.harness import HarnessModel, Settings, cut_at_stops, settings_from

SIDES, PER_BUCKET, NEW_TOKENS = (336, 672), 2, 8


@pytest.fixture(scope="module")
def checkpoint(synthetic_data, tmp_path_factory):
    """A randomly initialised tiny LLaVA-1.5 as training leaves it (its config.json names family and tokenizer)."""
    from uhd_jax.models.vlm import init_fn
    from uhd_jax.train.checkpoints import save_params
    from uhd_jax.train.trainer import model_for_stage

    config = on_synthetic_data("configs/llava15.py:tiny", synthetic_data)
    params = nn.meta.unbox(jax.jit(init_fn(model_for_stage(config, config.stages.sft)))(
        jax.random.PRNGKey(4))["params"])
    work = tmp_path_factory.mktemp("work")
    final = str(work / "runs" / "tiny" / "sft" / "final")
    save_params(final, params, {"model": config.model.to_dict()})
    os.makedirs(work / "data")
    os.symlink(synthetic_data["tokenizer"], work / "data" / "tokenizer")
    with open(os.path.join(final, "config.json"), "w") as f:
        json.dump({"model": config.model.to_dict(), "family": "llava15", "stage": "sft", "steps": 1,
                   "tokenizer": "data/tokenizer"}, f)
    return final


@pytest.fixture(scope="module")
def offline(checkpoint, tmp_path_factory):
    """`uhd-evaluate --benchmark synthetic_reading` on the benchmark: its answers by question id and its scores."""
    from uhd_jax.cli.evaluate import main as evaluate
    from uhd_jax.eval.answers import read_answers

    work = tmp_path_factory.mktemp("reading")
    assert evaluate(["--benchmark", "synthetic_reading", "--checkpoint", checkpoint, "--workdir", str(work),
                     "--per-bucket", str(PER_BUCKET), "--sides", *map(str, SIDES), "--batch-size", "4",
                     "--max-new-tokens", str(NEW_TOKENS)]) == 0
    answers = read_answers(str(work / "answers_tiny-sft.jsonl"))
    with open(work / "results.json") as f:
        return {a["question_id"]: a["text"] for a in answers}, json.load(f)["tiny-sft"]


@pytest.fixture(scope="module")
def harness(checkpoint):
    return HarnessModel(checkpoint, benchmark="synthetic_reading", batch_size=4)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """`uhd-evaluate --benchmark synthetic_reading --lmms-tasks DIR`: the tasks' folder and their documents."""
    from uhd_jax.cli.evaluate import main as evaluate

    out = tmp_path_factory.mktemp("lmms")
    assert evaluate(["--benchmark", "synthetic_reading", "--lmms-tasks", str(out), "--per-bucket", str(PER_BUCKET),
                     "--sides", *map(str, SIDES), "--max-new-tokens", str(NEW_TOKENS)]) == 0
    return {"include_path": str(out / "tasks"), "docs": str(out / "tasks" / "docs.jsonl")}


def docs(tasks):
    with open(tasks["docs"]) as f:
        return [json.loads(line) for line in f]


def test_generation_kwargs_and_stop_strings():
    assert settings_from({"max_new_tokens": 16, "temperature": 0, "do_sample": False, "until": ["\n\n"]}) == Settings(
        16, 0.0, 1.0, 1, ("\n\n",))
    # a temperature without do_sample stays greedy, as HF generate(); until may be one string
    assert settings_from({"temperature": 0.7, "top_p": 0.9, "until": "ASSISTANT:"}) == Settings(
        None, 0.0, 1.0, 1, ("ASSISTANT:",))
    assert settings_from({"temperature": 0.7, "top_p": 0.9, "do_sample": True, "num_beams": 3}) == Settings(
        None, 0.7, 0.9, 3, ())
    assert cut_at_stops("red car\n\nUSER: more", ("\n\n", "USER:")) == "red car"
    assert cut_at_stops("red car", ("\n\n",)) == "red car"


def test_mistakes_are_one_line(checkpoint, tmp_path, capsys):
    from tests.cli_mistakes import assert_mistake
    from uhd_jax.cli.evaluate import main as evaluate
    from uhd_jax.cli_errors import UserError

    assert_mistake(capsys, evaluate, ["--benchmark", "gqa", "--lmms-tasks", tmp_path], "--benchmark synthetic_reading")
    assert_mistake(capsys, evaluate, ["--benchmark", "synthetic_reading", "--lmms-tasks", tmp_path, "--sides", "0"],
                   "positive numbers")
    with pytest.raises(UserError, match="batch_size must be at least 1"):
        HarnessModel(checkpoint, batch_size=0)
    with pytest.raises(UserError, match="no tokens"):
        HarnessModel(checkpoint, batch_size=1).loglikelihood([("What?", "", None)])


def test_harness_answers_as_uhd_evaluate(harness, tasks, offline):
    """The lmms-eval task's prompts (the question file's text) and images (PIL, as doc_to_visual gives them) get
    the answers uhd-evaluate wrote for the same questions."""
    from uhd_jax.integrations.lmms_task import doc_to_text, doc_to_visual

    answers, _ = offline
    ds = docs(tasks)
    got = harness.generate([(doc_to_text(d), doc_to_visual(d), Settings(max_new_tokens=NEW_TOKENS)) for d in ds])
    assert got == [answers[d["question_id"]] for d in ds]
    assert harness.compilations <= 2   # one bucket per prompt length the benchmark touches


def test_loglikelihood_is_one_unpadded_forward(harness, tasks):
    """Batched and left-padded into buckets, each continuation's log-probability is that of its sequence run alone
    (float32, 1e-5), and it is reported greedy exactly when each of its tokens is the argmax there."""
    from uhd_jax.integrations.lmms_task import doc_to_text, doc_to_visual
    from uhd_jax.models.vlm import VLM

    ds = docs(tasks)[:2]
    answering = harness.answering(Settings(max_new_tokens=1))
    prompts = [answering.prompt({"question_id": i, "text": doc_to_text(d), "image": d["image"]})
               for i, d in enumerate(ds)]
    tok, cfg, params = harness.loaded.tokenizer, harness.loaded.cfg, harness.loaded.params
    # two options of one question, of one token length: a single reference program (the batch's rows are still
    # left-padded into their bucket, beside filler rows)
    d = ds[0]
    lengths = {}
    for opt in d["options"]:
        lengths.setdefault(len(tok(" " + opt, add_special_tokens=False)["input_ids"]), []).append(opt)
    pair = max(lengths.values(), key=len)[:2]
    requests = [(doc_to_text(d), doc_to_visual(d), " " + opt) for opt in pair]
    assert len(requests) == 2
    forward = jax.jit(lambda params, *inputs: VLM(cfg).apply({"params": params}, *inputs)[0])
    got = harness.loglikelihood([(text, cont, images) for text, images, cont in requests])
    for (text, images, cont), (logp, n, greedy) in zip(requests, got):
        p = prompts[[doc_to_text(d) for d in ds].index(text)]
        cont_ids = tok(cont, add_special_tokens=False)["input_ids"]
        ids = np.concatenate([p["ids"], cont_ids])[None].astype(np.int32)
        image_map = np.concatenate([p["image_map"], np.full(len(cont_ids), -1)])[None].astype(np.int32)
        logits = forward(params, jnp.asarray(ids), jnp.ones(ids.shape, bool), jnp.arange(ids.shape[1])[None],
                         jnp.asarray(p["pixels"])[None], jnp.asarray(image_map))
        logits = np.asarray(logits[0], np.float64)
        logp_all = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        start = len(p["ids"])
        want = sum(logp_all[start - 1 + k, t] for k, t in enumerate(cont_ids))
        assert n == len(cont_ids) and logp == pytest.approx(want, rel=1e-5, abs=1e-5)
        assert greedy == all(int(np.argmax(logits[start - 1 + k])) == t for k, t in enumerate(cont_ids))


# ---------------------------------------------------------------- through lmms-eval itself


@pytest.fixture(scope="module")
def lmms_results(checkpoint, tasks):
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install --no-deps lmms-eval==0.7.3)")
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    from uhd_jax.integrations.lmms_task import CHOICE, GENERATE

    return evaluator.simple_evaluate(model="uhd_jax",
                                     model_args=f"checkpoint={checkpoint},benchmark=synthetic_reading,batch_size=4",
                                     tasks=[GENERATE, CHOICE], log_samples=True,
                                     task_manager=TaskManager(include_path=tasks["include_path"]))


def test_lmms_eval_finds_the_model_through_its_entry_point():
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed")
    from lmms_eval.models import get_model

    from uhd_jax.integrations.lmms_model import UHDJax

    assert get_model("uhd_jax") is UHDJax


def test_lmms_eval_scores_as_uhd_evaluate(lmms_results, offline, harness, tasks):
    """generate_until: the same answer per question and the same exact / VQA / ANLS numbers as uhd-evaluate.
    multiple_choice: lmms-eval's accuracy is the share of questions whose right option (the first) has the lowest
    mean negative log-likelihood per token among the options."""
    from uhd_jax.integrations.lmms_task import CHOICE, GENERATE, doc_to_text, doc_to_visual

    answers, scores = offline
    samples = {s["doc"]["question_id"]: s["filtered_resps"][0] for s in lmms_results["samples"][GENERATE]}
    assert samples == answers
    res = lmms_results["results"][GENERATE]
    for metric in ("exact", "vqa", "anls"):
        assert res[f"{metric},none"] == pytest.approx(scores["overall"][metric])
    right = 0
    for d in docs(tasks):
        ll = harness.loglikelihood([(doc_to_text(d), " " + o, doc_to_visual(d)) for o in d["options"]])
        losses = [-logp / n for logp, n, _ in ll]
        right += int(np.argmin(losses) == 0)
    assert lmms_results["results"][CHOICE]["acc,none"] == pytest.approx(right / len(docs(tasks)))
