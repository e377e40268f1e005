"""User mistakes on the command line: one message that says what is wrong and what to do, exit status 2, no
traceback.

Library code raises `UserError` where the cause can only be the caller's input (a missing file, a name that does not
exist, a checkpoint that belongs to another model); a CLI's `main` wrapped in `reports_user_errors` prints it as
`<script>: error: <message>` on stderr and returns 2, the status argparse uses for its own usage errors. Anything else
keeps its traceback: it is a bug to fix, not a mistake to explain.

  @reports_user_errors
  def main(argv=None) -> int: ...

`load_config` finds `configs/NAME.py[:variant]` from the current directory, else among the configs shipped
in this package (so the commands work from any directory), turns a bad spec into a UserError and applies `--config.KEY=VALUE`
overrides (the syntax of uhd-train), naming an unknown key and the keys that exist. A list or tuple field takes
a literal (`--config.stages.sft.sources='[{"json": "a.json", "image_folder": "imgs"}]'`), comma-separated strings where
it holds strings (`--config.stages.sft.init_checkpoints=a,b`), or nothing to empty it.
"""
from __future__ import annotations

import ast
import functools
import inspect
import os
import sys


class UserError(ValueError):
    """A mistake in the command or its inputs. A ValueError, so callers that handle bad input keep working."""


def reports_user_errors(main):
    """`main(argv) -> int`, with a UserError printed as one line on stderr and returned as exit status 2."""
    module_file = os.path.basename(inspect.getfile(main))

    @functools.wraps(main)
    def wrapped(argv=None):
        # The name the user typed (uhd-train, launch/train.py), as argparse's usage errors say it; in-process calls
        # with an argv list are named by the module.
        script = os.path.basename(sys.argv[0]) if argv is None and sys.argv and sys.argv[0] else module_file
        try:
            return main(argv)
        except UserError as e:
            print(f"{script}: error: {e}", file=sys.stderr)
            return 2

    return wrapped


def require_file(path: str, what: str, hint: str) -> str:
    """`path` if it is a file; else a UserError naming `what` (e.g. '--questions') and what to do."""
    if not os.path.isfile(path):
        state = "is a directory, not a file" if os.path.isdir(path) else "not found"
        raise UserError(f"{what} {path}: {state}; {hint}")
    return path


def require_dir(path: str, what: str, hint: str) -> str:
    if not os.path.isdir(path):
        state = "is a file, not a directory" if os.path.isfile(path) else "not found"
        raise UserError(f"{what} {path}: {state}; {hint}")
    return path


def find_config(spec: str, flag: str = "--config") -> str:
    """`spec` with its file found (see `config_loading.config_path`); a UserError naming where it looked when it is
    in neither place."""
    from uhd_jax.config_loading import PACKAGE, config_path

    path, colon, variant = spec.partition(":")
    found = config_path(path)
    if found is not None:
        return found + colon + variant
    where = "" if os.path.isabs(path) else f" in {os.getcwd()} or under the installed package ({PACKAGE})"
    raise UserError(f"{flag} {spec}: config file {path!r} not found{where} (expected e.g. configs/llava15.py:7b)")


def load_config(spec: str, overrides: list[str] = (), flag: str = "--config"):
    """The experiment config `configs/NAME.py[:variant]` (see `find_config`) with `overrides` ('model.dtype=float32',
    ...) applied; `flag` names where the spec came from in the message."""
    from uhd_jax.config_loading import load_config as load

    found = find_config(spec, flag)
    try:
        config = load(found)
    except (FileNotFoundError, AttributeError, KeyError, ValueError) as e:   # no file, no get_config, bad variant
        message = str(e).strip("'")   # a KeyError quotes its message
        raise UserError(f"{flag} {spec}: {message}") from None
    for item in overrides:
        apply_override(config, item)
    return config


def split_overrides(extra: list[str], parser) -> list[str]:
    """The `--config.KEY=VALUE` items among argparse's unknown arguments; anything else is argparse's usage error."""
    overrides, rest = [], []
    it = iter(extra)
    for arg in it:
        if arg.startswith("--config."):
            item = arg[len("--config."):]
            if "=" not in item:   # '--config.model.dtype float32'
                value = next(it, None)
                if value is None:
                    parser.error(f"{arg}: give a value, e.g. {arg}=VALUE")
                item = f"{item}={value}"
            overrides.append(item)
        else:
            rest.append(arg)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return overrides


def _parse_sequence(text: str, current):
    """A list or tuple value: a Python/JSON literal ('[...]', '(...)'), an empty value for an empty one, or - where
    the field holds strings or numbers (or nothing yet) - comma-separated items: `init_checkpoints=a,b`,
    `length_buckets=768,1024`. The result keeps the
    field's type (a tuple stays a tuple) and the kind of its items (strings stay strings, sources stay dicts), so a
    quoting slip cannot turn a list of paths into one string or a list of characters."""
    import json

    stripped = text.strip()
    items_are = {type(x) for x in current}   # empty: nothing to keep to
    if not stripped:
        value = []
    elif stripped[0] in "[(":
        try:
            value = ast.literal_eval(stripped)
        except (ValueError, SyntaxError):
            try:
                value = json.loads(stripped)   # JSON spellings: true, false, null
            except json.JSONDecodeError as e:
                raise ValueError(f"not a Python or JSON list ({e})") from None
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {type(value).__name__}")
    elif items_are <= {str} or items_are <= {int, float}:
        value = [_parse_item(part.strip(), items_are) for part in stripped.split(",") if part.strip()]
    else:
        raise ValueError(f"write the whole list as a literal, e.g. '{json.dumps(list(current[:1]), default=str)}'")
    if items_are == {str} and not all(isinstance(x, str) for x in value):
        raise ValueError("every item must be a string (quote each one inside the list)")
    if current and all(hasattr(x, "keys") for x in current) and not all(isinstance(x, dict) for x in value):
        raise ValueError("every item must be a {...} mapping like the config's")
    return tuple(value) if isinstance(current, tuple) else list(value)


def _parse_item(text: str, items_are: set):
    """One comma-separated item: a number where the field holds numbers (or nothing yet and the item reads as one:
    `length_buckets=768,1024`), else the string (`init_checkpoints=a,b`)."""
    if items_are <= {int, float}:
        try:
            return int(text)
        except ValueError:
            try:
                return float(text)
            except ValueError:
                if items_are:
                    raise ValueError(f"{text!r} is not a number") from None
    return text


def _parse_value(text: str, current):
    if isinstance(current, (list, tuple)):
        return _parse_sequence(text, current)
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError("expected true or false")
    if isinstance(current, float):
        return float(text)
    if isinstance(current, int):
        return int(text)
    if isinstance(current, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_override(config, item: str) -> None:
    """One `KEY.PATH=VALUE`, parsed as the type of the value it replaces."""
    key, eq, text = item.partition("=")
    if not eq or not key:
        raise UserError(f"--config.{item}: write overrides as --config.KEY=VALUE, e.g. --config.model.dtype=float32")
    node, parts = config, key.split(".")
    for depth, part in enumerate(parts):
        where = ".".join(["config"] + parts[:depth])
        keys = list(node.keys()) if hasattr(node, "keys") else []
        if part not in keys:
            raise UserError(f"--config.{key}: unknown config key {part!r}; {where} has {sorted(keys)}")
        if depth < len(parts) - 1:
            node = node[part]
    current = node[parts[-1]]
    if hasattr(current, "keys"):
        raise UserError(f"--config.{key} is a section, not a value; set one of its keys: {sorted(current.keys())}")
    try:
        node[parts[-1]] = _parse_value(text, current)
    except (ValueError, TypeError) as e:
        raise UserError(f"--config.{key}={text}: not a valid {type(current).__name__} ({e}); the config has "
                        f"{current!r}") from None
