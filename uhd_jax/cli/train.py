"""Train every stage of an experiment config (or the ones named with --stages).

  uhd-train --config configs/llava15.py:7b                        # every stage, in runs/llava15-7b
  uhd-train --config configs/llava15.py:7b --stages=sft --config.stages.sft.grad_accum=2
  uhd-train --config configs/llava15.py:7b --data sft=my_sft.json:my_images/ --workdir runs/mine

Paths: a flag's (--workdir, --data, --config) are relative to the current directory; the config's own (sources,
image folders, tokenizer, init checkpoints) to config.data_root (default `data`) unless absolute, also when set with
--config.KEY=VALUE. `batch_size` is the global batch; `grad_accum` splits it into micro-batches (each stage prints
the split when it starts).

Before anything is built, every stage to run is checked - data files, image folders, tokenizer, init checkpoints (or
the earlier stage of this run they come from), batch vs devices, trainable rules - and everything missing is
reported at once.

Multi-host: --coordinator=HOST:PORT --num-processes=N --process-id=I, or --distributed-auto (SLURM / TPU pods).
A run killed at any point resumes from its last checkpoint with the same command. SIGTERM (a preemption) or Ctrl-C
first saves a checkpoint of the current step, then exits with status 128 + the signal's number.

A mistake in the command or in what the config names is a message on stderr (one line per problem) and exit
status 2.
"""
from __future__ import annotations

import argparse
import os
import sys

from absl import flags, logging  # noqa: E402

flags.FLAGS.mark_as_parsed()  # Grain reads absl flags; this CLI parses its own
logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO

from uhd_jax.cli_errors import UserError, reports_user_errors, split_overrides  # noqa: E402
from uhd_jax.train.cli import add_config_arguments, default_workdir, load_run_config, run_order  # noqa: E402


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
                                usage="%(prog)s --config configs/NAME.py[:variant] [--workdir DIR] [--stages=a,b] "
                                      "[--data STAGE=FILE.json:IMAGE_FOLDER] [--config.KEY=VALUE ...]")
    add_config_arguments(p)
    p.add_argument("--workdir", default=None,
                   help="run directory: checkpoints, logs, final parameters per stage (default: runs/NAME-VARIANT)")
    p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 for multi-process runs")
    p.add_argument("--num-processes", type=int, default=None, help="number of processes (with --coordinator)")
    p.add_argument("--process-id", type=int, default=None, help="this process's index (with --coordinator)")
    p.add_argument("--distributed-auto", action="store_true",
                   help="jax.distributed.initialize() with cluster auto-detection")
    # the spellings of earlier versions, still accepted
    p.add_argument("--num_processes", dest="num_processes", type=int, help=argparse.SUPPRESS)
    p.add_argument("--process_id", dest="process_id", type=int, help=argparse.SUPPRESS)
    p.add_argument("--distributed_auto", dest="distributed_auto", action="store_true", help=argparse.SUPPRESS)
    a, extra = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    config = load_run_config(a.config, split_overrides(extra, p), a.data)
    if a.coordinator and (a.num_processes is None or a.process_id is None):
        p.error("--coordinator needs --num-processes and --process-id")
    stages = run_order(config, a.stages)
    workdir = a.workdir or default_workdir(a.config, config)
    if os.path.isfile(workdir):
        raise UserError(f"--workdir {workdir} is a file; give a directory (created if missing)")
    init_distributed(a)
    from uhd_jax.train.trainer import Preempted, run

    print(f"train.py: stages {', '.join(stages)} of {a.config} in {workdir}", flush=True)
    try:
        run(config, workdir, stages)
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
