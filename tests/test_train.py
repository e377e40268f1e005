"""Training: learning, frozen parameters, accumulation, exact resume, non-finite steps, checkpoint safety, 2 processes."""
import glob
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from tests.cli_mistakes import assert_mistake
from tests.config_helpers import on_synthetic_data
from uhd_jax.cli_errors import UserError
from uhd_jax.config_loading import load_config
from uhd_jax.models.vlm import VLM, init_fn
from uhd_jax.train import optimizer as opt
from uhd_jax.train.checkpoints import TrainCheckpointer, load_params
from uhd_jax.train.metrics_log import read_metrics
from uhd_jax.train.param_tree import flatten
from uhd_jax.train.state import TrainState
from uhd_jax.train.step import make_train_step
from uhd_jax.train.trainer import TrainingDiverged, model_for_stage, run_stage, stage_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data, **stage_overrides):
    return on_synthetic_data("configs/llava15.py:tiny", data, **{
        **dict(batch_size=8, max_length=112, save_every=4, num_steps=8, log_every=1), **stage_overrides})


def losses(workdir, stage):
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(workdir, stage, "metrics.jsonl")) if "loss" in r}


def test_loss_decreases_and_frozen_parameters_stay_bit_identical(synthetic_data, tmp_path, capsys):
    c = tiny_config(synthetic_data, num_steps=24, init_from_stage="", lrs={"projector": 3e-3, "llm": 3e-3})
    res = run_stage(c, "sft", str(tmp_path))
    # How the global batch is split, said when the stage starts: 8 = 1 step x 4 devices (data x fsdp) x 2.
    assert ("stage sft: global batch 8 = 1 accumulation step(s) x 4 data-parallel device(s) (of 8) x 2 per device "
            "(micro-batch 8; mesh data=2 fsdp=2 tensor=2, 1 process(es)); 48 samples, 24 steps (4.00 epochs)") \
        in capsys.readouterr().out
    # final/config.json names the config's variant and the tokenizer's absolute path for launch/generate.py.
    meta = json.loads(open(os.path.join(res.final_dir, "config.json")).read())
    assert meta["variant"] == "tiny" and meta["family"] == "llava15" and meta["stage"] == "sft"
    assert os.path.isabs(meta["tokenizer"]) and os.path.samefile(meta["tokenizer"], synthetic_data["tokenizer"])
    curve = [r["loss"] for r in res.history]
    assert np.mean(curve[-4:]) < np.mean(curve[:4]) - 0.5, curve
    # Each row logs the rate its update used: optax's warmup-cosine at the optimizer's count before the step.
    warmup = int(round(24 * c.stages.sft.warmup_ratio))
    for group, lr in (("projector", 3e-3), ("llm", 3e-3)):
        reference = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, 24, 0.0)
        logged = [r[f"lr_{group}"] for r in res.history]
        np.testing.assert_allclose(logged, [float(reference(s - 1)) for s in range(1, 25)], rtol=1e-6, atol=1e-12)
        assert logged[-1] < logged[len(logged) // 2] and max(logged) > 0
    # The vision tower is frozen: bit-identical to the stage's random initialisation; the rest moved. (The trainer
    # initialised on a 2x2x2 mesh; a jitted init without any mesh gives the same numbers: init depends on the seed
    # alone.)
    cfg = model_for_stage(c, c.stages.sft)
    seed = c.seed + list(c.stage_order).index("sft")
    init = flatten(nn.meta.unbox(jax.jit(init_fn(cfg))(jax.random.PRNGKey(seed))["params"]))
    final = flatten(load_params(res.final_dir))
    for k, v in final.items():
        same = np.array_equal(np.asarray(v), np.asarray(init[k]))
        assert same == k.startswith("vision/"), k
    # The optimizer state holds moments for the trained groups only.
    state_dir = os.path.join(tmp_path, "sft", "checkpoints", "24", "state")
    tree = ocp.StandardCheckpointer().metadata(state_dir).item_metadata.tree["opt_state"]
    opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert any("projector" in p for p in opt_paths) and any("llm" in p for p in opt_paths)
    assert not any("vision" in p for p in opt_paths)


def test_gradient_accumulation_equals_one_large_batch():
    c = load_config("configs/llava15.py:tiny")
    cfg = model_for_stage(c, c.stages.sft)
    model = VLM(cfg)
    params = nn.meta.unbox(init_fn(cfg)(jax.random.PRNGKey(0))["params"])
    labels = opt.group_labels(params, [("vision/.*", "frozen"), (".*", "rest")])
    # SGD with rate 1: the parameter change is exactly the gradient (Adam would normalise away its scale).
    tx = optax.multi_transform({"rest": optax.sgd(1.0)}, opt.trainable_labels(labels))
    split = lambda ps: opt.split_trainable(ps, labels)  # noqa: E731
    rng = np.random.default_rng(0)
    b, length = 4, 24
    mask = rng.random((b, length)) < 0.5
    batch = {"input_ids": rng.integers(3, 120, (b, length)).astype(np.int32), "targets": rng.integers(3, 120, (
        b, length)).astype(np.int32), "loss_mask": mask, "token_valid": np.ones((b, length), bool),
        "positions": np.broadcast_to(np.arange(length), (b, length)).astype(np.int32),
        "pixel_values": rng.normal(size=(b, 1, 56, 56, 3)).astype(np.float32),
        "image_token_map": np.full((b, length), -1, np.int32)}
    step = jax.jit(make_train_step(model, tx, split))
    state = lambda: TrainState(jnp.int32(0), params, tx.init(split(params)[0]))  # noqa: E731
    one, m1 = step(state(), {k: v[None] for k, v in batch.items()})
    two, m2 = step(state(), {k: v.reshape(2, 2, *v.shape[1:]) for k, v in batch.items()})
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    assert float(m1["tokens"]) == mask.sum()
    for a, bb in zip(jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(two.params)):
        np.testing.assert_allclose(a, bb, rtol=1e-5, atol=1e-6)
    # A batch whose loss is not finite leaves the state untouched.
    bad = dict(batch, pixel_values=np.full_like(batch["pixel_values"], np.nan),
               image_token_map=np.tile(np.r_[np.arange(16), -np.ones(8, int)], (b, 1)).astype(np.int32))
    kept, m3 = step(state(), {k: v[None] for k, v in bad.items()})
    assert not bool(m3["finite"]) and int(kept.step) == 0
    for a, bb in zip(jax.tree_util.tree_leaves(kept.params), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, bb)


def tensorboard_scalars(directory, tag="loss"):
    """[(step, value)] as TensorBoard shows them: event files in name (creation time) order, a SessionLog START at
    step s hiding what earlier files logged at steps >= s."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    rows = []
    for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
        data, pos = open(path, "rb").read(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                rows = [(s, v) for s, v in rows if s < event.step]
            rows += [(event.step, v.simple_value) for v in event.summary.value if v.tag == tag]
    return rows


def test_resume_after_interruption_is_exact(synthetic_data, tmp_path, capsys):
    c = tiny_config(synthetic_data, init_from_stage="")
    run_stage(c, "sft", str(tmp_path / "straight"))
    # Killed at step 6, two steps after the checkpoint of step 4: steps 5 and 6 run twice.
    run_stage(c, "sft", str(tmp_path / "resumed"), stop_after=6)
    assert max(losses(tmp_path / "resumed", "sft")) == 6
    run_stage(c, "sft", str(tmp_path / "resumed"))
    a, b = losses(tmp_path / "straight", "sft"), losses(tmp_path / "resumed", "sft")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for s in range(5, 9):
        assert a[s] == b[s], (s, a[s], b[s])
    # Each step once, with the resumed run's value, in metrics.jsonl and in what TensorBoard shows.
    rows = read_metrics(os.path.join(tmp_path, "resumed", "sft", "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, 9))
    shown = tensorboard_scalars(os.path.join(tmp_path, "resumed", "sft", "tensorboard"))
    assert [s for s, _ in shown] == list(range(1, 9))
    np.testing.assert_allclose([v for _, v in shown], [b[s] for s in range(1, 9)], rtol=1e-6)
    # A stage whose last checkpoint is its last step (killed while writing final/) finishes without training and
    # reports the loss it ended with, not nan.
    import shutil

    shutil.rmtree(tmp_path / "resumed" / "sft" / "final")
    capsys.readouterr()
    run_stage(c, "sft", str(tmp_path / "resumed"))
    out = capsys.readouterr().out
    assert f"stage sft step 8 loss {b[8]:.6f}" in out, out
    assert [r["step"] for r in read_metrics(os.path.join(tmp_path, "resumed", "sft", "metrics.jsonl"))] == \
        list(range(1, 9))


def test_mistakes_in_a_stage_stop_it_before_training_and_write_no_final(synthetic_data, tmp_path):
    empty = tmp_path / "data" / "empty.json"
    os.makedirs(empty.parent)
    empty.write_text("[]")
    cases = [
        # empty data: trained 0 steps and wrote an untrained final/ (num_steps unset), or a bare StopIteration
        (dict(sources=[dict(json=str(empty), image_folder="images")], num_steps=0),
         r"stage sft: stages.sft.sources\[0\].json .*empty.json holds no samples"),
        (dict(sources=[dict(json=str(empty), image_folder="images")], num_steps=8),
         r"stage sft: stages.sft.sources\[0\].json .*empty.json holds no samples"),
        (dict(num_steps=0, num_epochs=0.0), r"stage sft: 0 steps to train \(48 samples, num_epochs 0.0"),
        # a misspelt rule trained nothing of the LLM for the whole run, without a word
        (dict(trainable=[("vision/.*", "frozen"), ("projector/.*", "projector"), ("llm/layer/.*", "llm"),
                         (".*", "frozen")]),
         r"stages.sft.trainable\[2\] \('llm/layer/.\*', 'llm'\) matches no parameter; stages.sft.lrs.llm is the "
         r"rate of a group no parameter is in"),
        (dict(trainable=[("vision/.*", "frozen"), (".*", "frozen"), ("projector/.*", "projector")],
              lrs={"projector": 1e-3}),
         r"trainable\[2\] \('projector/.\*', 'projector'\) matches \d+ parameter\(s\), all taken by earlier rules"),
        (dict(lrs={"projector": 1e-3, "llm": 1e-3, "vision": 1e-3}), r"stages.sft.lrs.vision is the rate of a group "
                                                                       r"no parameter is in"),
        # 12 / 2 = 6 samples per micro-batch on 4 data-parallel devices: a raw IndivisibleError at step 1
        (dict(batch_size=12, grad_accum=2),
         r"stage sft: batch_size 12 with grad_accum 2 does not split over the mesh \{'data': 2, 'fsdp': 2, "
         r"'tensor': 2\}.* multiple of 8"),
    ]
    for i, (overrides, message) in enumerate(cases):
        c = tiny_config(synthetic_data, init_from_stage="")
        c.stages.sft.update(overrides)
        workdir = tmp_path / f"run{i}"
        with pytest.raises(UserError, match=message):
            run_stage(c, "sft", str(workdir))
        assert not os.path.exists(workdir / "sft" / "final"), overrides


def test_every_shipped_config_names_only_rules_and_rates_that_train_something():
    """`trainable` rules and `lrs` of every stage of every config's small variants, checked on the abstract model."""
    from uhd_jax.models.config import vlm_config
    from uhd_jax.models.vlm import init_fn as init

    checked = []
    for path in sorted(glob.glob(os.path.join(REPO, "uhd_jax", "configs", "*.py"))):
        if os.path.basename(path) in ("__init__.py", "common.py"):
            continue
        for variant in ("tiny", "demo"):
            try:
                c = load_config(f"{path}:{variant}")
            except ValueError:   # the config has no such variant
                continue
            if c.model.get("slime"):
                c.model.slime.separator_id = 0   # looked up in the tokenizer otherwise; shapes do not depend on it
            for name in c.stage_order:
                stage = c.stages[name]
                if stage.get("kind", "llava") == "jbu":   # a fixed split of its own, no rules
                    continue
                boxed = jax.eval_shape(init(vlm_config(stage_model(c, stage))), jax.random.PRNGKey(0))["params"]
                opt.check_rules(nn.meta.unbox(boxed), [tuple(r) for r in stage.trainable], dict(stage.lrs),
                                where=f"{os.path.basename(path)}:{variant} stages.{name}")
                checked.append(f"{os.path.basename(path)}:{variant}:{name}")
    assert len(checked) >= 15, checked


def test_consecutive_non_finite_steps_stop_the_run_with_the_last_good_checkpoint(synthetic_data, tmp_path):
    c = tiny_config(synthetic_data, lrs={"projector": 1e30}, max_bad_steps=2, num_steps=12, save_every=1,
                    warmup_ratio=0.0)
    with pytest.raises(TrainingDiverged, match=r"2 consecutive non-finite steps .* last good checkpoint is step \d+"):
        run_stage(c, "pretrain", str(tmp_path))
    events = [r for r in read_metrics(os.path.join(tmp_path, "pretrain", "metrics.jsonl")) if "event" in r]
    assert events and all(len(e["batch_ids"]) == 8 for e in events)


def test_an_interrupted_save_leaves_the_previous_checkpoint_restorable(tmp_path):
    state = {"w": np.arange(6.0).reshape(2, 3)}
    ck = TrainCheckpointer(str(tmp_path), save_every=1, keep=3, async_save=False)
    ck.save(2, state, {"next_index": 5}, {"step": 2})
    ck.wait()
    ck.close()
    # A save killed mid-way leaves only Orbax's uncommitted temporary directory behind.
    partial = tmp_path / "4.orbax-checkpoint-tmp-1234"
    os.makedirs(partial / "state")
    (partial / "state" / "garbage").write_bytes(b"\0" * 10)
    ck = TrainCheckpointer(str(tmp_path), save_every=1, keep=3, async_save=False)
    assert ck.latest_step() == 2
    restored, data_state, meta = ck.restore(2, {"w": jax.ShapeDtypeStruct((2, 3), np.float64)})
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert data_state == {"next_index": 5} and meta == {"step": 2}


def test_two_processes_train_in_lockstep(synthetic_data, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.symlink(synthetic_data["root"], tmp_path / "synthetic")  # the tiny config reads synthetic/*.json
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONUNBUFFERED="1")
    args = [sys.executable, os.path.join(REPO, "launch", "train.py"), "--config",
            os.path.join(REPO, "uhd_jax", "configs", "llava15.py") + ":tiny", "--workdir", str(tmp_path / "run"),
            "--stages=pretrain", f"--config.data_root={tmp_path}",
            "--config.model.llm.vocab_size=640", "--config.stages.pretrain.num_steps=4",
            "--config.stages.pretrain.batch_size=8", "--config.stages.pretrain.max_length=112",
            "--config.stages.pretrain.save_every=2", "--config.mesh.fsdp=2",
            f"--coordinator=127.0.0.1:{port}", "--num-processes=2"]
    with open(tmp_path / "p0.log", "w") as l0, open(tmp_path / "p1.log", "w") as l1:
        procs = [subprocess.Popen(args + [f"--process-id={i}"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                  cwd=REPO) for i, log in enumerate((l0, l1))]
        codes = [p.wait(timeout=600) for p in procs]
    logs = [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], logs
    finals = [next(line for line in log.splitlines() if "stage pretrain step 4 loss" in line) for log in logs]
    assert finals[0].split("loss")[1] == finals[1].split("loss")[1]
    assert "[process 0]" in finals[0] and "[process 1]" in finals[1]
    ckpts = sorted(os.listdir(tmp_path / "run" / "pretrain" / "checkpoints"))
    assert ckpts == ["2", "4"]
    data_states = sorted(f for f in os.listdir(tmp_path / "run" / "pretrain" / "checkpoints" / "4" / "data")
                         if f.endswith(".json"))
    assert data_states == ["process_0-of-2.json", "process_1-of-2.json"]
    assert json.loads((tmp_path / "run" / "pretrain" / "final" / "config.json").read_text())["stage"] == "pretrain"


def test_init_checkpoints_overlay_converted_weights_in_either_layer_layout(tmp_path):
    """A converter output (unscanned) initialises a model whose config scans its layers, and vice versa."""
    from tests.torch_helpers import tiny_llava
    from uhd_jax.convert.cli import main as convert_cli
    from uhd_jax.parallel.mesh import make_mesh
    from uhd_jax.parallel.sharding import DEFAULT_RULES, init_sharded
    from uhd_jax.train.trainer import overlay_checkpoints

    ref = tiny_llava(seed=3)
    ref.save_pretrained(tmp_path / "hf")
    assert convert_cli(["import", "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    converted = flatten(load_params(tmp_path / "ckpt"))
    for scan in (False, True):
        c = load_config("configs/llava15.py:tiny")
        c.model.scan_layers = scan
        cfg = model_for_stage(c, c.stages.sft)
        mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
        variables, shardings = init_sharded(init_fn(cfg), mesh, DEFAULT_RULES, jax.random.PRNGKey(0))
        params = overlay_checkpoints(variables["params"], shardings["params"], [str(tmp_path / "ckpt")], scan)
        flat = flatten(params)
        if scan:
            np.testing.assert_array_equal(flat["llm/layers/attn/q/kernel"][1],
                                          converted["llm/layers_1/attn/q/kernel"])
            assert flat["llm/layers/attn/q/kernel"].sharding.spec[1:] == ("fsdp", "tensor", None)
        else:
            for k, v in converted.items():
                np.testing.assert_array_equal(np.asarray(flat[k]), np.asarray(v), err_msg=k)
    c = load_config("configs/llava15.py:tiny")
    c.model.llm.vocab_size = 256  # the checkpoint's embedding has 128 rows
    cfg = model_for_stage(c, c.stages.sft)
    variables, shardings = init_sharded(init_fn(cfg), make_mesh({"data": 8}), DEFAULT_RULES, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"does not fit the model: .*llm/embed_tokens/embedding: \(128, 32\)"):
        overlay_checkpoints(variables["params"], shardings["params"], [str(tmp_path / "ckpt")], False)


def test_user_mistakes_on_the_command_line_are_one_line_and_exit_status_2(synthetic_data, tmp_path, capsys):
    from uhd_jax.cli import train as train_cli

    os.symlink(synthetic_data["root"], tmp_path / "synthetic")   # the tiny config reads synthetic/*
    base = ["--config", os.path.join(REPO, "uhd_jax", "configs", "llava15.py") + ":tiny", "--workdir", str(tmp_path / "run"),
            "--stages=pretrain", f"--config.data_root={tmp_path}", "--config.model.llm.vocab_size=640"]
    cases = [
        (["--config", "configs/llava15.py:nope", "--workdir", "w"], "unknown variant 'nope'"),
        (base + ["--config.stages.pretrain.batchsize=8"], "unknown config key 'batchsize'"),
        (base + ["--stages=pretrain,sftt"], "--stages: unknown stage(s) ['sftt']"),
        (base + ["--config.stages.pretrain.sources=[{'json': 'synthetic/train_pretrain.json', 'image_folder': "
                 "'synthetic/imagez'}]"], "sources[0].image_folder"),
        (base + ["--config.stages.pretrain.sources=[{'json': 'synthetic/train_pretrain.json', 'folder': 'x'}]"],
         "stages.pretrain.sources[0] {'json': 'synthetic/train_pretrain.json', 'folder': 'x'}: expected {'json': "
         "FILE, 'image_folder': DIR"),
        (base + ["--config.tokenizer=synthetic/no_tokenizer"], "no_tokenizer: not found"),
        (base + ["--config.stages.pretrain.init_checkpoints=checkpoints/llava15-init"],
         "stages.pretrain.init_checkpoints[0] " + str(tmp_path / "checkpoints" / "llava15-init") + ": not found"),
        (base + ["--config.stages.pretrain.batch_size=12"], "batch_size 12 with grad_accum 1 does not split"),
        (base + ["--data", "pretrain=synthetic/train_pretrain.json"], "write STAGE=FILE.json:IMAGE_FOLDER"),
        (base + ["--workdir", str(tmp_path / "synthetic" / "train_sft.json")], "is a file; give a directory"),
    ]
    for argv, needle in cases:
        code = train_cli.main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, (argv, err)
        assert err.startswith("train.py: error: ") and needle in err and "\n" not in err, (needle, err)
    assert not os.path.exists(tmp_path / "run" / "pretrain" / "final")


def test_every_stage_is_checked_before_anything_is_built_and_all_problems_are_reported_at_once(tmp_path, monkeypatch,
                                                                                                capsys):
    """`train.py --config configs/uhd_v2.py` with no data and no --workdir: one report of what every stage lacks,
    each line naming the stage and the config key; a stage that an earlier stage of the same run produces is not
    missing."""
    from uhd_jax.cli import train as train_cli

    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert train_cli.main(["--config", "configs/uhd_v2.py"]) == 2
    out, err = capsys.readouterr()
    assert "stages jbu, pretrain, sft of configs/uhd_v2.py in runs/uhd_v2-7b" in out   # the default run directory
    assert err.startswith("train.py: error: 8 problems with the inputs of stage(s) jbu, pretrain, sft, found before "
                          "anything was built") and "Traceback" not in err
    lines = err.strip().splitlines()[1:]
    data = os.path.join("data", "")
    expected = [
        f"config.tokenizer {data}checkpoints/vicuna-7b-v1.5: not found",
        f"stage jbu: stages.jbu.sources[0].image_folder {data}cocostuff/images/train2017: not found",
        f"stage jbu: stages.jbu.init_checkpoints[0] {data}checkpoints/uhd_v2-7b-init: not found; convert the "
        f"PyTorch weights with `uhd-convert import ... --out {data}checkpoints/uhd_v2-7b-init`",
        f"stage pretrain: stages.pretrain.sources[0].json {data}LLaVA-Pretrain/blip_laion_cc_sbu_558k.json: not "
        f"found",
        f"stage pretrain: stages.pretrain.sources[0].image_folder {data}LLaVA-Pretrain/images: not a directory",
        f"stage pretrain: stages.pretrain.init_checkpoints[0] {data}checkpoints/uhd_v2-7b-init: not found",
        f"stage sft: stages.sft.sources[0].json {data}llava_v1_5_mix665k.json: not found",
        "stage sft: stages.sft.sources[0].image_folder data: not a directory"]
    assert len(lines) == len(expected), lines
    for line, start in zip(lines, expected):
        assert line.strip().startswith(start), (line, start)
    assert not os.path.exists(tmp_path / "runs")   # nothing written

    # Run alone, sft needs pretrain finished in the run directory; a misspelt rule of a later stage is in the same
    # report as the first stage's missing data.
    err = assert_mistake(capsys, train_cli.main, ["--config", "configs/uhd_v2.py", "--stages=sft", "--workdir", "w",
                                                  "--config.stages.sft.trainable=[('llm/.*', 'llm')]"], "problems")
    assert "stage sft starts from stage pretrain (stages.sft.init_from_stage), which has not finished in w: run " \
           "it first (--stages=pretrain,sft)" in err
    assert "stage sft: stages.sft.lrs.projector is the rate of a group no parameter is in" in err


def test_an_epoch_counts_the_sources_as_the_pipeline_weighs_them(synthetic_data, tmp_path):
    """Weights 2 and 0.5 on two 24-sample files: an epoch the pipeline builds holds 48 + 12 samples, so 1 epoch in
    batches of 8 is 8 steps (the plain sum, 48 samples, trained 6 steps and stopped mid-epoch)."""
    from uhd_jax.data.dataset import read_samples
    from uhd_jax.train.trainer import preflight, stage_steps

    samples = read_samples(synthetic_data["train"]["sft"])
    for name, part in (("a", samples[:24]), ("b", samples[24:])):
        (tmp_path / f"{name}.json").write_text(json.dumps(part))
    c = tiny_config(synthetic_data, init_from_stage="", num_steps=0, num_epochs=1.0)
    c.stages.sft.sources = [dict(json=str(tmp_path / "a.json"), image_folder="images", weight=2.0),
                            dict(json=str(tmp_path / "b.json"), image_folder="images", weight=0.5)]
    assert preflight(c, str(tmp_path / "run"), ["sft"]) == {"sft": 60}
    assert stage_steps(c.stages.sft, 60) == 8


def test_sigterm_saves_the_current_step_ends_the_data_workers_and_the_same_command_resumes(synthetic_data, tmp_path):
    """A preemption's SIGTERM used to kill the run between checkpoints and orphan its Grain workers (~450 MB
    each)."""
    os.symlink(synthetic_data["root"], tmp_path / "synthetic")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla-cache"))
    cmd = [sys.executable, os.path.join(REPO, "launch", "train.py"), "--config",
           os.path.join(REPO, "uhd_jax", "configs", "llava15.py") + ":tiny", "--workdir", str(tmp_path / "run"),
           "--stages=pretrain", f"--config.data_root={tmp_path}", "--config.model.llm.vocab_size=640",
           "--config.stages.pretrain.num_steps=1000", "--config.stages.pretrain.batch_size=8",
           "--config.stages.pretrain.max_length=112", "--config.stages.pretrain.save_every=500",
           "--config.data.num_workers=2"]
    metrics = tmp_path / "run" / "pretrain" / "metrics.jsonl"

    def start_and_wait_for(condition, log_name):
        log = open(tmp_path / log_name, "w")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.time() + 300
        while not condition() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / log_name).read_text()
        return proc

    def children(pid):   # every thread's: Grain starts its workers from helper threads
        found = []
        for stat in glob.glob("/proc/[0-9]*/stat"):
            try:
                with open(stat) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(stat.split("/")[2]))
        return found

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split()[2] != "Z"
        except FileNotFoundError:
            return False

    proc = start_and_wait_for(lambda: len(read_metrics(str(metrics))) >= 3, "first.log")
    workers = children(proc.pid)
    assert len(workers) >= 2, workers   # Grain's two workers (and multiprocessing's resource tracker)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    took = time.time() - sent
    log = (tmp_path / "first.log").read_text()
    assert code == 128 + signal.SIGTERM, log
    assert took < 60, took
    last = max(r["step"] for r in read_metrics(str(metrics)))
    assert os.listdir(tmp_path / "run" / "pretrain" / "checkpoints") == [str(last)], log
    assert f"stopped by SIGTERM after step {last} (checkpoint of step {last}" in log
    deadline = time.time() + 10
    while any(alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not [w for w in workers if alive(w)], "data workers outlived the run"
    assert not os.path.exists(tmp_path / "run" / "pretrain" / "final")

    # The same command resumes from that step.
    proc = start_and_wait_for(lambda: f"resumed from step {last}" in (tmp_path / "second.log").read_text(),
                              "second.log")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM after step" in (tmp_path / "second.log").read_text()
