"""The console scripts' and launch/ scripts' entry points: each restarts the process with huge pages where that
helps (`host_memory.restart_with_huge_pages`) before its program, and the program's imports of numpy and JAX,
are loaded."""
from __future__ import annotations

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


def train(argv=None):
    return run("train", argv)


def generate(argv=None):
    return run("generate", argv)


def evaluate(argv=None):
    return run("evaluate", argv)


def convert(argv=None):
    return run("convert", argv)


def check_data(argv=None):
    return run("check_data", argv)


def show_slices(argv=None):
    return run("show_slices", argv)


def benchmark(argv=None):
    return run("benchmark", argv)


def demo(argv=None):
    return run("demo", argv)


def serve(argv=None):
    return run("serve", argv)


def chat(argv=None):
    return run("chat", argv)
