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
