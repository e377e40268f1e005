"""Load `configs/NAME.py[:variant]` the way big_vision does: import the file, call `get_config(variant)`."""
from __future__ import annotations

import importlib.util
import os
import sys

# The installed package: `configs/uhd_v2.py` not found in the current directory is uhd_jax/configs/uhd_v2.py, so the
# shipped configs work from any directory. A config of one's own imports them as `from uhd_jax.configs import uhd_v2`.
PACKAGE = os.path.dirname(os.path.abspath(__file__))
SHIPPED = os.path.join(PACKAGE, "configs")


def config_path(path: str) -> str | None:
    """The file a config spec's path names: as given (relative to the current directory), else, when relative, under
    the package; None when neither exists."""
    if os.path.isfile(path):
        return path
    shipped = os.path.join(PACKAGE, path)
    if not os.path.isabs(path) and os.path.isfile(shipped):
        return shipped
    return None


def load_config(spec: str):
    given, _, arg = spec.partition(":")
    path = config_path(given)
    if path is None:
        raise FileNotFoundError(f"config file {given!r} not found (expected e.g. configs/llava15.py:7b)")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.realpath(folder) != os.path.realpath(SHIPPED):
        # A config of one's own may import its siblings (`from my_configs import base`) from wherever it is run.
        root = os.path.dirname(folder)
        if root not in sys.path:
            sys.path.insert(0, root)
    name = "_uhd_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"{path} has no get_config(arg)")
    return module.get_config(arg or None)
