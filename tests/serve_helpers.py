"""A tiny LLaVA-1.5 checkpoint laid out as training leaves it, for the engine and server tests."""
import json
import os

import flax.linen as nn
import jax

from tests.config_helpers import on_synthetic_data


def tiny_checkpoint(synthetic_data, folder, seed: int = 4) -> str:
    """A randomly initialised tiny LLaVA-1.5 in FOLDER/runs/tiny/sft/final, recording its family and its tokenizer
    (FOLDER/data/tokenizer, relative to FOLDER) as `uhd-train` does."""
    from uhd_jax.models.vlm import init_fn
    from uhd_jax.train.checkpoints import save_params
    from uhd_jax.train.trainer import model_for_stage

    config = on_synthetic_data("configs/llava15.py:tiny", synthetic_data)
    cfg = model_for_stage(config, config.stages.sft)
    params = nn.meta.unbox(jax.jit(init_fn(cfg))(jax.random.PRNGKey(seed))["params"])
    final = os.path.join(folder, "runs", "tiny", "sft", "final")
    save_params(final, params, {"model": config.model.to_dict()})
    os.makedirs(os.path.join(folder, "data"))
    os.symlink(synthetic_data["tokenizer"], os.path.join(folder, "data", "tokenizer"))
    with open(os.path.join(final, "config.json"), "w") as f:
        json.dump({"model": config.model.to_dict(), "family": "llava15", "stage": "sft", "steps": 1,
                   "tokenizer": "data/tokenizer"}, f)
    return final


def eval_images(synthetic_data, count: int) -> list[str]:
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
