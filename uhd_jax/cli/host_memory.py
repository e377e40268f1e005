"""Transparent huge pages for the buffers of JAX's CPU steps: commands restart themselves once with glibc's
`glibc.malloc.hugetlb=1` tunable.

XLA's CPU runtime allocates each execution's temporaries as one block (254 MB for the llava15:demo SFT step at B8,
L512). glibc maps a block that size afresh and unmaps it on free, so every step faulted in and zeroed 68,600 pages of
4 KB: 0.15-0.18 s of kernel time per step beside 0.56-0.64 s of user time (benchmarks/README.md). With the tunable,
glibc asks for huge pages on its mappings (`madvise(MADV_HUGEPAGE)`, honoured when the kernel's THP mode is
`madvise` or `always`): ~400 faults and 0.04-0.06 s of kernel time per step, the step 0.31 s against 0.38-0.49 s.
Keeping the freed block instead (`mallopt`: one arena, no `mmap`) removed the faults too, but serialised the
threads' small allocations on one arena lock: the attention loop's products ran 2.7x slower.

Tunables are read when a process starts, hence the restart (`os.execve` of the same command line, before the
command imports anything heavy). It happens only where it changes something: JAX computes on the CPU (no GPU/TPU
plugin installed, or JAX_PLATFORMS starts with `cpu`), the C library is glibc >= 2.35, the kernel's THP mode is
`madvise` (under `always` every large mapping gets huge pages already; under `never` none can), the tunable is not
already set, and UHD_JAX_HUGE_PAGES is not `off`.
"""
from __future__ import annotations

import importlib.util
import os
import sys

ENV = "UHD_JAX_HUGE_PAGES"          # 'off': never restart; set to 'restarted' in the restarted process
TUNABLE = "glibc.malloc.hugetlb"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def accelerator_plugin_installed() -> bool:
    """A JAX GPU/TPU plugin is installed, found the ways JAX finds them, without importing anything: the
    `jax_plugins` entry points (jax-cuda*-plugin), the `jax_plugins` namespace package, and libtpu."""
    from importlib.metadata import entry_points

    if list(entry_points(group="jax_plugins")) or importlib.util.find_spec("libtpu") is not None:
        return True
    spec = importlib.util.find_spec("jax_plugins")
    folders = (spec.submodule_search_locations or []) if spec is not None else []
    return any(not entry.startswith(("_", ".")) for folder in folders for entry in os.listdir(folder))


def runs_on_cpu(environ) -> bool:
    """Whether JAX in this process will compute on the CPU: JAX_PLATFORMS when set (its first platform), else no
    accelerator plugin installed."""
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not accelerator_plugin_installed()


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc, None for another C library."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, OSError, ValueError):
        return None


def thp_mode(path: str = THP_ENABLED) -> str | None:
    """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), None where it cannot be read."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    chosen = [word[1:-1] for word in text.split() if word.startswith("[")]
    return chosen[0] if chosen else None


def huge_page_environment(environ, *, glibc: tuple[int, int] | None, thp: str | None) -> dict | None:
    """The environment to restart with, or None where a restart would change nothing (see the module doc)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if environ.get(ENV) in ("off", "restarted") or TUNABLE in tunables:
        return None
    if glibc is None or glibc < (2, 35) or thp != "madvise" or not runs_on_cpu(environ):
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"
    env[ENV] = "restarted"
    return env


def restart_with_huge_pages() -> None:
    """Replace this process with the same command under `huge_page_environment`, where it applies; else return."""
    env = huge_page_environment(os.environ, glibc=glibc_version(), thp=thp_mode())
    if env is not None and sys.executable:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)
