"""Train every stage of an experiment config (or the ones named with --stages).

  python launch/train.py --config configs/llava15.py:7b --workdir runs/llava15-7b [--config.stages.sft.batch_size=64]
  python launch/train.py --config configs/llava15.py:demo --workdir runs/demo --stages=pretrain

Multi-host: --coordinator=HOST:PORT --num_processes=N --process_id=I, or --distributed_auto (SLURM / TPU pods).
A run killed at any point resumes from its last checkpoint with the same command. SIGTERM (a preemption) or Ctrl-C
first saves a checkpoint of the current step, then exits with status 128 + the signal's number.

A mistake in the command or in what the config names (a file, a folder, the tokenizer, an init checkpoint, a key, a
stage) is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags, logging  # noqa: E402

flags.FLAGS.mark_as_parsed()  # Grain reads absl flags; this CLI parses its own
logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO

from uhd_jax.cli_errors import UserError, load_config, reports_user_errors, split_overrides  # noqa: E402


def init_distributed(a):
    import jax

    if not (a.coordinator or a.distributed_auto):
        return
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if a.distributed_auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=a.coordinator, num_processes=a.num_processes,
                                   process_id=a.process_id)


@reports_user_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s --config configs/NAME.py[:variant] --workdir DIR [--stages=a,b] "
                                      "[--config.KEY=VALUE ...]")
    p.add_argument("--config", required=True, help="experiment config: configs/NAME.py[:variant]")
    p.add_argument("--workdir", required=True, help="run directory: checkpoints, logs, final parameters per stage")
    p.add_argument("--stages", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help="stages to run, comma-separated (default: config.stage_order)")
    p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 for multi-process runs")
    p.add_argument("--num_processes", type=int, default=None, help="number of processes (with --coordinator)")
    p.add_argument("--process_id", type=int, default=None, help="this process's index (with --coordinator)")
    p.add_argument("--distributed_auto", action="store_true",
                   help="jax.distributed.initialize() with cluster auto-detection")
    a, extra = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    config = load_config(a.config, split_overrides(extra, p))
    unknown = [s for s in a.stages or () if s not in config.stage_order]
    if unknown:
        raise UserError(f"--stages: unknown stage(s) {unknown}; {a.config} has {list(config.stage_order)}")
    if a.coordinator and (a.num_processes is None or a.process_id is None):
        p.error("--coordinator needs --num_processes and --process_id")
    init_distributed(a)
    from uhd_jax.train.trainer import Preempted, run

    try:
        run(config, a.workdir, a.stages)
    except Preempted as e:
        print(f"train.py: {e}", file=sys.stderr, flush=True)
        return 128 + e.signum
    except KeyboardInterrupt as e:   # a second Ctrl-C / SIGTERM while the first one's checkpoint was being saved
        print(f"train.py: interrupted ({e or 'KeyboardInterrupt'}); the last finished checkpoint stays",
              file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
