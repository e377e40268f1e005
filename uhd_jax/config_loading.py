"""Load `configs/NAME.py[:variant]` the way big_vision does: import the file, call `get_config(variant)`."""
from __future__ import annotations

import importlib.util
import os
import sys

# The checkout whose `configs` package the shipped configs (and configs extending them) import.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(spec: str):
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found (expected e.g. configs/llava15.py:7b)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:  # configs import `configs.common`
        sys.path.insert(0, root)
    if REPO not in sys.path:  # a config of one's own, anywhere, extends a shipped one: `from configs import uhd_v2`
        sys.path.append(REPO)
    name = "_uhd_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"{path} has no get_config(arg)")
    return module.get_config(arg or None)
