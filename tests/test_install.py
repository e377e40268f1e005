"""The accelerator extras of setup.py resolve against the package index with the pinned jax (pip's resolver in
--dry-run: nothing is installed). Needs the package index; skipped with the reason when it cannot be reached."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("extra, plugin", [("cuda12", "jax-cuda12-plugin"), ("tpu", "libtpu")])
def test_accelerator_extra_resolves_with_the_pinned_jax(tmp_path, extra, plugin):
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
                           f"{REPO}[{extra}]"], capture_output=True, text=True, timeout=600)
    if proc.returncode and any(s in proc.stderr for s in ("NewConnectionError", "Temporary failure in name",
                                                          "Network is unreachable", "ConnectTimeout")):
        pytest.skip(f"package index unreachable: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    resolved = {item["metadata"]["name"].lower(): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}
    import jax

    assert plugin in resolved, f"{extra} did not pull {plugin}: {sorted(resolved)}"
    if extra == "cuda12":
        # the plugin and its PJRT runtime must be built for exactly the pinned jax
        assert resolved["jax-cuda12-plugin"] == jax.__version__
        assert resolved["jax-cuda12-pjrt"] == jax.__version__
        assert "nvidia-cudnn-cu12" in resolved
    assert "jax" not in resolved and "jaxlib" not in resolved, "the extra must not move the jax pin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`pip install .` of this checkout into a folder of its own (no dependencies: they are this venv's), so the
    commands below run from that install and not from the checkout."""
    import shutil

    # What a source distribution holds, copied: setuptools builds in the source folder, and this keeps its build/
    # out of the checkout (and shows that nothing outside these files is needed).
    source = tmp_path_factory.mktemp("source")
    shutil.copy(os.path.join(REPO, "setup.py"), source)
    shutil.copytree(os.path.join(REPO, "uhd_jax"), source / "uhd_jax", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(source)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return target


def run_installed(installed, cwd, *argv):
    env = dict(os.environ, PYTHONPATH=str(installed))
    return subprocess.run([str(installed / "bin" / argv[0]), *argv[1:]], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_pip_install_gives_every_command_outside_the_checkout(installed, tmp_path):
    import configparser
    import glob

    scripts = configparser.ConfigParser()
    scripts.read(glob.glob(str(installed / "uhd_jax-*.dist-info" / "entry_points.txt")))
    names = sorted(scripts["console_scripts"])
    assert names == ["uhd-benchmark", "uhd-chat", "uhd-check-data", "uhd-convert", "uhd-demo", "uhd-evaluate",
                     "uhd-generate", "uhd-serve", "uhd-show-slices", "uhd-train"]
    # Every script's target resolves in the install (one process: each import of jax costs seconds) ...
    check = ("import importlib, sys, uhd_jax\n"
             "for target in sys.argv[1:]:\n"
             "    module, _, function = target.partition(':')\n"
             "    assert callable(getattr(importlib.import_module(module), function)), target\n"
             "print(uhd_jax.__file__)")
    proc = subprocess.run([sys.executable, "-c", check, *(scripts["console_scripts"][n] for n in names)],
                          capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(installed)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(installed / "uhd_jax" / "__init__.py")
    # ... and a script runs as the user would start it
    proc = run_installed(installed, tmp_path, "uhd-generate", "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: uhd-generate"), proc.stderr[-2000:]


def test_installed_commands_find_the_shipped_configs_from_any_directory(installed, tmp_path):
    """The shipped configs travel with the package: `--config configs/llava15.py:tiny` from an empty directory is
    the installed file, and its stage's missing data is the preflight report (exit 2), not a missing config."""
    proc = run_installed(installed, tmp_path, "uhd-train", "--config", "configs/llava15.py:tiny", "--stages=sft")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "stages.sft.sources[0].json" in proc.stderr
    assert f"in {os.path.join('runs', 'llava15-tiny')}" in proc.stdout   # the run directory, relative to the cwd
    proc = run_installed(installed, tmp_path, "uhd-convert", "layouts")
    assert proc.returncode == 0 and "llava_hf" in proc.stdout, proc.stderr
