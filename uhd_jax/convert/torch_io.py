"""Streaming reads and sharded writes of PyTorch checkpoints (safetensors or .bin, single or sharded with an index).

Reads yield one tensor at a time as numpy (bf16 widened to float32, which is exact), so peak memory stays near one
copy of the converted weights. No torch model is ever built.
"""
from __future__ import annotations

import json
import os
from typing import Iterator

import numpy as np

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


def checkpoint_files(path: str) -> list[str]:
    """The tensor files of a checkpoint given as a file or a directory."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    for index in INDEX_FILES:
        ip = os.path.join(path, index)
        if os.path.exists(ip):
            weight_map = _read_json(ip).get("weight_map")
            if not weight_map or not isinstance(weight_map, dict):
                raise ValueError(f"{ip}: no 'weight_map' in the index file")
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
            if missing:
                raise FileNotFoundError(f"{ip} names shard files that are missing: {missing}")
            return [os.path.join(path, f) for f in files]
    for single in SINGLE_FILES:
        if os.path.exists(os.path.join(path, single)):
            return [os.path.join(path, single)]
    found = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin")))
    if not found:
        raise FileNotFoundError(f"no .safetensors or .bin tensor files in {path}")
    return [os.path.join(path, f) for f in found]


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): the file is corrupt or truncated") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, expected an object")
    return data


class _SafetensorsFile:
    """safe_open with the file named in every failure: a truncated or corrupt file raises safetensors' own
    SafetensorError, which does not say which file, when opened or when the missing tensor is read."""

    def __init__(self, path: str):
        self.path = path

    def _fail(self, e: Exception) -> ValueError:
        return ValueError(f"cannot read {self.path} as safetensors ({e}): the file is corrupt or truncated; "
                          f"download it again")

    @staticmethod
    def _errors() -> tuple:
        from safetensors import SafetensorError

        return SafetensorError, OSError

    def _open(self):
        from safetensors import safe_open

        try:
            return safe_open(self.path, framework="pt")
        except self._errors() as e:
            raise self._fail(e) from None

    def keys(self) -> list[str]:
        with self._open() as f:
            return list(f.keys())

    def tensors(self):
        with self._open() as f:
            for key in f.keys():
                try:
                    t = f.get_tensor(key)
                except self._errors() as e:
                    raise self._fail(e) from None
                yield key, t


def _to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.detach().cpu().contiguous().numpy()


def _iter_file(path: str) -> Iterator[tuple[str, "object"]]:
    if path.endswith(".safetensors"):
        yield from _SafetensorsFile(path).tensors()
    else:
        import torch

        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises several types for corrupt/legacy files
            raise ValueError(f"cannot read {path} as a PyTorch state dict: {e}") from e
        if not isinstance(state, dict):
            raise ValueError(f"{path} holds a {type(state).__name__}, expected a state dict of tensors")
        if isinstance(state.get("state_dict"), dict):  # a PyTorch Lightning checkpoint (e.g. FeatUp's VDIM .ckpt)
            state = state["state_dict"]
        for key in list(state):
            value = state.pop(key)
            if isinstance(value, torch.Tensor):
                yield key, value


def iter_tensors(path: str) -> Iterator[tuple[str, np.ndarray, str]]:
    """Yield (key, array, file) for every tensor of the checkpoint, one at a time."""
    for file in checkpoint_files(path):
        for key, t in _iter_file(file):
            yield key, _to_numpy(t), file


def list_keys(path: str) -> list[str]:
    keys = []
    for file in checkpoint_files(path):
        if file.endswith(".safetensors"):
            keys.extend(_SafetensorsFile(file).keys())
        else:
            keys.extend(k for k, _ in _iter_file(file))
    return keys


def read_config(path: str) -> dict | None:
    cp = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")
    if not os.path.exists(cp):
        return None
    return _read_json(cp)


def _torch_tensor(a: np.ndarray, dtype: str):
    import torch

    a = np.asarray(a, dtype=np.float32)  # (np.ascontiguousarray would turn a 0-d scalar into shape (1,))
    if not (a.flags.c_contiguous and a.flags.writeable):  # read-only views (jax arrays) cannot be shared
        a = np.array(a, order="C")
    t = torch.from_numpy(a)
    return t.to(torch.bfloat16) if dtype == "bfloat16" else t


class SafetensorsWriter:
    """Write tensors into `model.safetensors`, or into shards plus `model.safetensors.index.json` past `max_bytes`."""

    def __init__(self, directory: str, dtype: str = "float32", max_bytes: int = 5 * 2**30):
        self.directory, self.dtype, self.max_bytes = directory, dtype, max_bytes
        os.makedirs(directory, exist_ok=True)
        self.shards: list[dict[str, str]] = []
        self._current: dict = {}
        self._size = 0

    def add(self, key: str, array: np.ndarray):
        t = _torch_tensor(array, self.dtype)
        nbytes = t.numel() * t.element_size()
        if self._current and self._size + nbytes > self.max_bytes:
            self._flush()
        self._current[key] = t
        self._size += nbytes

    def _flush(self):
        from safetensors.torch import save_file

        name = f"shard-{len(self.shards):05d}.tmp.safetensors"
        save_file(self._current, os.path.join(self.directory, name), metadata={"format": "pt"})
        self.shards.append({k: name for k in self._current})
        self._current, self._size = {}, 0

    def close(self):
        if self._current or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            os.replace(os.path.join(self.directory, next(iter(self.shards[0].values()))),
                       os.path.join(self.directory, "model.safetensors"))
            return
        weight_map = {}
        for i, shard in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.directory, next(iter(shard.values()))), os.path.join(self.directory, final))
            weight_map.update({k: final for k in shard})
        with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)


def save_torch_bin(path: str, tensors: dict[str, np.ndarray], dtype: str = "float32"):
    import torch

    torch.save({k: _torch_tensor(v, dtype) for k, v in tensors.items()}, path)
