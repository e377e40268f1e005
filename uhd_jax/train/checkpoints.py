"""Parameter checkpoints: an Orbax tree under `params/` plus `config.json` (the model config and provenance).

Orbax commits a checkpoint by writing into a temporary directory and renaming it, so an interrupted save never
replaces the previous good one. Loading restores straight into the requested shardings.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def save_params(directory: str, params: Any, meta: dict) -> None:
    """Write `params` (numpy or jax arrays) and `meta` (must hold 'model', the `config.model` dict)."""
    directory = os.path.abspath(directory)
    if "model" not in meta:
        raise ValueError("checkpoint metadata needs a 'model' entry (the config.model dict)")
    os.makedirs(directory, exist_ok=True)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(directory, PARAMS_DIR), params, force=True)
    ckpt.wait_until_finished()
    if jax.process_index() == 0:  # written last: its presence marks a complete checkpoint
        tmp = os.path.join(directory, CONFIG_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True, default=str)
        os.replace(tmp, os.path.join(directory, CONFIG_FILE))


def load_meta(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} is not a uhd-jax checkpoint: {CONFIG_FILE} is missing")
    with open(path) as f:
        return json.load(f)


def load_params(directory: str, target: Any | None = None) -> Any:
    """Restore the parameter tree; `target` is a tree of `jax.ShapeDtypeStruct` with shardings (or None: default)."""
    path = os.path.join(os.path.abspath(directory), PARAMS_DIR)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{directory} is not a uhd-jax checkpoint: {PARAMS_DIR}/ is missing")
    return ocp.StandardCheckpointer().restore(path, target)


class IteratorSnapshot:
    """The data iterator's state as it was when a save was requested, in the shape Grain's Orbax handler expects.

    Saving a snapshot (not the live iterator) keeps an asynchronous save from recording a later position.
    """

    def __init__(self, state=None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes):
        self.state = json.loads(state)

    def start_prefetch(self):
        pass


class TrainCheckpointer:
    """Orbax CheckpointManager over three items per step: the train state, the data iterator state (one file per
    process) and JSON metadata. Saves are asynchronous and committed by rename: an interrupted save leaves the
    previous step restorable."""

    def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
        import grain

        self.save_every = save_every
        self.restored_meta: dict = {}
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 cleanup_tmp_directories=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step: int, state, iterator_state, meta: dict, force: bool = False) -> bool:
        import grain

        if not force and step % self.save_every:
            return False
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(IteratorSnapshot(iterator_state)),
            meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, step: int, abstract_state):
        import grain

        snapshot = IteratorSnapshot()
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(snapshot),
            meta=ocp.args.JsonRestore()))
        return out.state, snapshot.state, out.meta

    def resume(self, state, shardings, iterator):
        """(state, step): the latest checkpoint restored into `shardings` and the iterator set to its saved
        position, or (state, 0) unchanged when there is none. Its metadata is left in `self.restored_meta`."""
        self.restored_meta = {}
        latest = self.latest_step()
        if latest is None:
            return state, 0
        abstract = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                          state, shardings)
        state, data_state, self.restored_meta = self.restore(latest, abstract)
        iterator.set_state(data_state)
        return state, latest

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()
