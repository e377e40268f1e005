"""Train every stage of an experiment config (or the ones named with --stages).

  python launch/train.py --config configs/llava15.py:7b --workdir runs/llava15-7b [--config.stages.sft.batch_size=64]
  python launch/train.py --config configs/llava15.py:demo --workdir runs/demo --stages=pretrain

Multi-host: --coordinator=HOST:PORT --num_processes=N --process_id=I, or --distributed_auto (SLURM / TPU pods).
A run killed at any point resumes from its last checkpoint with the same command.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config: configs/NAME.py[:variant]")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, logs, final parameters per stage")
_STAGES = flags.DEFINE_list("stages", None, "stages to run (default: config.stage_order)")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0 for multi-process runs")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (with --coordinator)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (with --coordinator)")
_AUTO = flags.DEFINE_bool("distributed_auto", False, "jax.distributed.initialize() with cluster auto-detection")
flags.mark_flags_as_required(["config", "workdir"])


def init_distributed():
    import jax

    if not (_COORDINATOR.value or _AUTO.value):
        return
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if _AUTO.value:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)


def main(argv):
    del argv
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    init_distributed()
    from uhd_jax.train.trainer import run

    config = _CONFIG.value
    unknown = set(_STAGES.value or ()) - set(config.stage_order)
    if unknown:
        raise app.UsageError(f"unknown stage(s) {sorted(unknown)}; this config has {list(config.stage_order)}")
    run(config, _WORKDIR.value, _STAGES.value)


if __name__ == "__main__":
    app.run(main)
