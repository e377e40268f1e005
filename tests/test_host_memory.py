"""Commands restart once with glibc's huge-page tunable where JAX computes on the CPU, and on such a machine it
removes the page faults of a step's temporaries."""
import os
import subprocess
import sys

import pytest

from uhd_jax.cli import commands, host_memory as hm

CPU = {"JAX_PLATFORMS": "cpu"}
QUALIFIES = dict(glibc=(2, 36), thp="madvise")


def test_the_restart_environment_adds_the_tunable_once():
    env = hm.huge_page_environment(dict(CPU, PATH="/bin"), **QUALIFIES)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1" and env[hm.ENV] == "restarted" and env["PATH"] == "/bin"
    theirs = hm.huge_page_environment(dict(CPU, GLIBC_TUNABLES="glibc.malloc.arena_max=2"), **QUALIFIES)
    assert theirs["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    # the restarted process, a user's own setting and the opt-out never restart
    assert hm.huge_page_environment(env, **QUALIFIES) is None
    assert hm.huge_page_environment(dict(CPU, GLIBC_TUNABLES="glibc.malloc.hugetlb=0"), **QUALIFIES) is None
    assert hm.huge_page_environment(dict(CPU, UHD_JAX_HUGE_PAGES="off"), **QUALIFIES) is None


@pytest.mark.parametrize("environ, glibc, thp", [
    ({"JAX_PLATFORMS": "cuda"}, (2, 36), "madvise"),        # an accelerator computes the steps
    ({"JAX_PLATFORMS": "tpu,cpu"}, (2, 36), "madvise"),
    (CPU, (2, 34), "madvise"),                              # glibc without the tunable
    (CPU, None, "madvise"),                                 # another C library
    (CPU, (2, 36), "always"),                               # every large mapping gets huge pages already
    (CPU, (2, 36), "never"),
    (CPU, (2, 36), None),
])
def test_no_restart_where_it_would_change_nothing(environ, glibc, thp):
    assert hm.huge_page_environment(environ, glibc=glibc, thp=thp) is None


def test_each_command_entry_point_runs_its_own_program():
    for name, module in commands.PROGRAMS.items():
        assert getattr(commands, name).args == (name,)
        assert module == ("uhd_jax.convert.cli" if name == "convert" else f"uhd_jax.cli.{name}")


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert hm.thp_mode(str(path)) == "madvise"
    assert hm.thp_mode(str(tmp_path / "missing")) is None


def applies_here() -> bool:
    return hm.huge_page_environment(CPU, glibc=hm.glibc_version(), thp=hm.thp_mode()) is not None


# Five runs of a jitted program whose temporaries are ~100 MB (one block, mapped afresh by glibc at each run).
FAULTS = """
import resource
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.exp(jnp.outer(x, x)) * jnp.cos(jnp.outer(x, x) + 1.0)))
x = jnp.linspace(0.0, 1e-3, 3600)
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    f(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not applies_here(), reason="needs glibc >= 2.35 and the kernel's THP mode 'madvise'")
def test_commands_restart_with_huge_pages_and_fault_far_less():
    """What a command does first (`uhd_jax.cli.commands.run`), then the program: the restarted process carries the
    tunable, and the same program faults in its temporaries with a small fraction of the page faults."""
    restart = "from uhd_jax.cli.host_memory import restart_with_huge_pages\nrestart_with_huge_pages()\n"
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hm.ENV)}
    runs = {}
    for name, extra in (("huge", {}), ("off", {hm.ENV: "off"})):
        proc = subprocess.run([sys.executable, "-c", restart + "import os\nprint(os.environ.get('GLIBC_TUNABLES'))\n"
                               + FAULTS], capture_output=True, text=True, env=dict(env, **extra), timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[name] = proc.stdout.split()
    assert runs["huge"][0] == "glibc.malloc.hugetlb=1" and runs["off"][0] == "None"
    huge, off = int(runs["huge"][1]), int(runs["off"][1])
    assert off > 5 * 20000 and huge * 10 < off, (huge, off)
