"""Training: learning, frozen parameters, accumulation, exact resume, non-finite steps, checkpoint safety, 2 processes."""
import json
import os
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from tests.config_helpers import on_synthetic_data
from uhd_jax.config_loading import load_config
from uhd_jax.models.vlm import VLM, init_fn
from uhd_jax.train import optimizer as opt
from uhd_jax.train.checkpoints import TrainCheckpointer, load_params
from uhd_jax.train.metrics_log import read_metrics
from uhd_jax.train.param_tree import flatten
from uhd_jax.train.state import TrainState
from uhd_jax.train.step import make_train_step
from uhd_jax.train.trainer import TrainingDiverged, model_for_stage, run_stage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data, **stage_overrides):
    return on_synthetic_data("configs/llava15.py:tiny", data, **{
        **dict(batch_size=8, max_length=112, save_every=4, num_steps=8, log_every=1), **stage_overrides})


def losses(workdir, stage):
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(workdir, stage, "metrics.jsonl")) if "loss" in r}


def test_loss_decreases_and_frozen_parameters_stay_bit_identical(synthetic_data, tmp_path):
    c = tiny_config(synthetic_data, num_steps=24, init_from_stage="", lrs={"projector": 3e-3, "llm": 3e-3})
    res = run_stage(c, "sft", str(tmp_path))
    curve = [r["loss"] for r in res.history]
    assert np.mean(curve[-4:]) < np.mean(curve[:4]) - 0.5, curve
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


def test_resume_after_interruption_is_exact(synthetic_data, tmp_path):
    c = tiny_config(synthetic_data, init_from_stage="")
    run_stage(c, "sft", str(tmp_path / "straight"))
    run_stage(c, "sft", str(tmp_path / "resumed"), stop_after=4)
    assert max(losses(tmp_path / "resumed", "sft")) == 4
    run_stage(c, "sft", str(tmp_path / "resumed"))
    a, b = losses(tmp_path / "straight", "sft"), losses(tmp_path / "resumed", "sft")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for s in range(5, 9):
        assert a[s] == b[s], (s, a[s], b[s])


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
            os.path.join(REPO, "configs", "llava15.py") + ":tiny", "--workdir", str(tmp_path / "run"),
            "--stages=pretrain", f"--config.data_root={tmp_path}",
            "--config.model.llm.vocab_size=640", "--config.stages.pretrain.num_steps=4",
            "--config.stages.pretrain.batch_size=8", "--config.stages.pretrain.max_length=112",
            "--config.stages.pretrain.save_every=2", "--config.mesh.fsdp=2",
            f"--coordinator=127.0.0.1:{port}", "--num_processes=2"]
    with open(tmp_path / "p0.log", "w") as l0, open(tmp_path / "p1.log", "w") as l1:
        procs = [subprocess.Popen(args + [f"--process_id={i}"], env=env, stdout=log, stderr=subprocess.STDOUT,
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
    from tools.convert_torch.__main__ import main as convert_cli
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
