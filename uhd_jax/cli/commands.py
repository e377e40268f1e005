"""The console scripts' and launch/ scripts' entry points. Each restarts the process with huge pages where that helps
(`host_memory.restart_with_huge_pages`), then imports and runs its program, so the restart comes before numpy and JAX
are loaded."""
from __future__ import annotations

import functools
import importlib

from uhd_jax.cli.host_memory import restart_with_huge_pages

PROGRAMS = {"train": "uhd_jax.cli.train", "generate": "uhd_jax.cli.generate", "evaluate": "uhd_jax.cli.evaluate",
            "convert": "uhd_jax.convert.cli", "check_data": "uhd_jax.cli.check_data",
            "show_slices": "uhd_jax.cli.show_slices", "benchmark": "uhd_jax.cli.benchmark", "demo": "uhd_jax.cli.demo",
            "serve": "uhd_jax.cli.serve", "chat": "uhd_jax.cli.chat"}


def run(program: str, argv=None):
    """Run `program` (a key of PROGRAMS) and return its exit status. argv None: it is this process's command
    (sys.argv), which may restart first; with argv (a caller running it in-process) it never restarts."""
    if argv is None:
        restart_with_huge_pages()
    return importlib.import_module(PROGRAMS[program]).main(argv)


# the console scripts' targets (setup.py COMMANDS): train(argv=None) runs uhd-train, and so on
train, generate, evaluate, convert, check_data, show_slices, benchmark, demo, serve, chat = (
    functools.partial(run, program) for program in PROGRAMS)
