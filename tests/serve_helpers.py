"""Tiny models with random weights saved as training leaves them, and request pieces, for the serving tests (the
API, chat, engine, server, page and sharded generation)."""
import contextlib
import json
import os

import flax.linen as nn
import jax

from tests.config_helpers import on_synthetic_data

_SHARED: dict = {}


def tiny_checkpoint(spec: str, family: str, synthetic_data, work, seed: int = 4) -> str:
    """`spec`'s sft model with random weights at WORK/runs/tiny/sft/final, its config.json recording the family and
    the tokenizer relative to WORK (WORK/data/tokenizer links the synthetic one), as `uhd-train` writes it."""
    from uhd_jax.models.config import vlm_config
    from uhd_jax.models.vlm import init_fn
    from uhd_jax.train.checkpoints import save_params
    from uhd_jax.train.trainer import stage_model

    work = str(work)
    config = on_synthetic_data(spec, synthetic_data)
    model = stage_model(config, config.stages.sft)   # what the sft stage records (SliME: its ',' separator id)
    cfg = vlm_config(model)
    params = nn.meta.unbox(jax.jit(init_fn(cfg))(jax.random.PRNGKey(seed))["params"])
    final = os.path.join(work, "runs", "tiny", "sft", "final")
    save_params(final, params, {"model": model})
    os.makedirs(os.path.join(work, "data"), exist_ok=True)
    if not os.path.exists(os.path.join(work, "data", "tokenizer")):
        os.symlink(synthetic_data["tokenizer"], os.path.join(work, "data", "tokenizer"))
    with open(os.path.join(final, "config.json"), "w") as f:
        json.dump({"model": model, "family": family, "stage": "sft", "steps": 1, "tokenizer": "data/tokenizer"}, f)
    return final


def shared_checkpoint(spec: str, family: str, synthetic_data, tmp_path_factory) -> str:
    """`tiny_checkpoint` made once per test session and reused by every test file: the tests only read it. Under
    xdist the first worker to ask builds it in the session's shared folder (initialising a model is a compile, 10-25 s
    on 2 cores) and each worker copies the parameters next to a link to its own synthetic tokenizer (the same bytes:
    the dataset and tokenizer are built from fixed seeds)."""
    import fcntl
    import re
    import shutil

    key = (spec, family, synthetic_data["root"])
    if key not in _SHARED:
        base = tmp_path_factory.getbasetemp()
        root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base   # the parent is this session's
        name = "tiny-" + re.sub(r"[^A-Za-z0-9]+", "-", spec)
        with open(root / (name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            built = root / name / "runs" / "tiny" / "sft" / "final"
            if not (built / "config.json").exists():
                tiny_checkpoint(spec, family, synthetic_data, root / name)
        work = tmp_path_factory.mktemp(family)
        shutil.copytree(root / name / "runs", work / "runs")
        os.makedirs(work / "data")
        os.symlink(synthetic_data["tokenizer"], work / "data" / "tokenizer")
        _SHARED[key] = str(work / "runs" / "tiny" / "sft" / "final")
    return _SHARED[key]


def eval_images(synthetic_data, count: int = 2) -> list[str]:
    folder = synthetic_data["images"] + "/eval"
    return [os.path.join(folder, name) for name in sorted(os.listdir(folder))[:count]]


def data_url(path: str) -> str:
    import base64

    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels and whose data is empty: a decompression bomb's calling
    card, a few dozen bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def user_message(text: str, url: str | None = None) -> list[dict]:
    parts = [{"type": "text", "text": text}] + ([{"type": "image_url", "image_url": {"url": url}}] if url else [])
    return [{"role": "user", "content": parts}]


@contextlib.contextmanager
def serving(model, limits=None, **engine_args):
    """`uhd-serve` over `model` on an ephemeral local port, in this process: the Server, stopped (and its engine
    closed) on exit. `limits`: an openai_schema.Limits (default: the server's)."""
    from uhd_jax.serve.engine import Engine
    from uhd_jax.serve.server import Server

    with Engine(model, **engine_args) as engine:
        server = Server(("127.0.0.1", 0), engine, model_id="tiny", **({"limits": limits} if limits else {}))
        server.start()
        try:
            yield server
        finally:
            server.shutdown()
            server.server_close()
