"""Step configs: typed dataclasses, loaded from JSON plus ``key=value`` overrides.

Every step has a frozen config dataclass whose fields carry a one-line
docstring (read back here for ``--help`` and for error messages). A config is
built from a JSON object and command-line overrides with type coercion, and
every problem names the field: ``batch_size: expected an integer, got 'ten'``.
Configs are never changed in place; a changed copy is a new object
(``dataclasses.replace``).

``cli`` is the ``python -m workers.<step> --config FILE [key=value ...]``
entry point shared by every step: it prints the step's result as JSON.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import os
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

C = TypeVar("C")

CONFIG_FILENAME = "ratchet_step_config.json"
"""the name of the config file written beside every step output"""


class WorkerError(Exception):
    """A worker step cannot run on its inputs; the message says what to fix."""


class ConfigError(WorkerError, ValueError):
    """A config value is missing, unknown, of the wrong type or out of range."""


# -- field documentation -----------------------------------------------------------


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls`` (and its bases), by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # no source (frozen app, REPL class)
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, following in zip(body, body[1:] + [None]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


# -- type coercion -----------------------------------------------------------------

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null"}


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (list, Sequence, tuple):
        args = typing.get_args(tp)
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin in (dict, Mapping):
        args = typing.get_args(tp)
        return f"an object of {_describe(args[1])}" if args else "an object"
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}.get(tp, getattr(tp, "__name__", str(tp)))


def coerce(value: Any, tp: Any, name: str, *, from_text: bool = False) -> Any:
    """``value`` as type ``tp`` for field ``name``; ``from_text`` parses command-line strings.

    Raises ``ConfigError`` naming the field, the expected type and the value.
    """

    def fail() -> ConfigError:
        return ConfigError(f"{name}: expected {_describe(tp)}, got {value!r}")

    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (from_text and isinstance(value, str) and value.lower() in _NONE)):
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, name, from_text=from_text)
            except ConfigError:
                continue
        raise fail()
    if value is None:
        raise fail()
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise fail()
    if origin in (list, Sequence, tuple, dict, Mapping):
        if from_text and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                # A bare comma-separated list is accepted for lists of scalars.
                if origin in (dict, Mapping):
                    raise fail() from None
                value = [v for v in value.split(",") if v != ""]
        if origin in (dict, Mapping):
            if not isinstance(value, Mapping):
                raise fail()
            _, vtype = typing.get_args(tp) or (str, Any)
            return {str(k): coerce(v, vtype, f"{name}.{k}", from_text=from_text) for k, v in value.items()}
        if not isinstance(value, (list, tuple)):
            raise fail()
        (etype,) = typing.get_args(tp)[:1] or (Any,)
        items = [coerce(v, etype, f"{name}[{i}]", from_text=from_text) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise fail()
    if tp is int:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if from_text and isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    number = float(value)
                except ValueError:
                    raise fail() from None
                if number.is_integer():
                    return int(number)
        raise fail()
    if tp is float:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, (int, float)):
            return float(value)
        if from_text and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise fail() from None
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise fail()
    raise ConfigError(f"{name}: unsupported config type {tp!r}")


# -- building configs --------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[C], data: Mapping[str, Any], *, source: str = "config") -> C:
    """Build and validate a ``cls`` config from a mapping (values already typed, as in JSON)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown field(s) {', '.join(unknown)} for {cls.__name__}; valid fields: {', '.join(fields)}"
        )
    hints = _hints(cls)
    values = {}
    for name, value in data.items():
        values[name] = coerce(value, hints[name], name)
    missing = [
        n for n, f in fields.items()
        if n not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)} for {cls.__name__}")
    cfg = cls(**values)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate()
    return cfg


def parse_overrides(cls: type, overrides: Sequence[str]) -> dict[str, Any]:
    """``["lr=1e-4", "device=cpu"]`` as typed values for ``cls``'s fields."""
    hints = _hints(cls)
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        if key not in hints:
            raise ConfigError(f"override {item!r}: {cls.__name__} has no field {key!r}; valid fields: {', '.join(hints)}")
        out[key] = coerce(text, hints[key], key, from_text=True)
    return out


def load_config(cls: type[C], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> C:
    """A ``cls`` config from a JSON file (optional) and ``key=value`` overrides.

    The file may hold the fields directly or a ``{"config": {...}}`` object
    as written beside outputs (``ratchet_step_config.json``), so a saved
    config can be re-run as is.
    """
    data: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
        if isinstance(data, dict) and set(data) >= {"step", "config"} and isinstance(data["config"], dict):
            data = data["config"]
    merged = {**data, **parse_overrides(cls, overrides)}
    return from_dict(cls, merged, source=source)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain JSON-able values."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def save_config(cfg: Any, directory: str | os.PathLike, *, step: str) -> Path:
    """Write ``ratchet_step_config.json`` (step name, config, versions) into ``directory``, atomically."""
    from workers.common.metrics import atomic_write_text  # local: metrics imports nothing from here

    payload = {"step": step, "config": to_dict(cfg), "versions": _versions()}
    path = Path(directory) / CONFIG_FILENAME
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def _versions() -> dict[str, str]:
    import torch
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}


def diff_configs(saved: Mapping[str, Any], current: Mapping[str, Any], *, ignore: set[str]) -> list[str]:
    """Human-readable differences between two config dicts, skipping ``ignore`` fields."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in ignore:
            continue
        if saved.get(key) != current.get(key):
            out.append(f"{key}: {saved.get(key)!r} then, {current.get(key)!r} now")
    return out


# -- range checks (for validate()) -------------------------------------------------


def check_at_least(cfg: Any, names: Sequence[str], minimum: int) -> None:
    """ConfigError naming the first of the fields ``names`` below ``minimum``, with its value."""
    for name in names:
        if getattr(cfg, name) < minimum:
            raise ConfigError(f"{name} ({getattr(cfg, name)}) must be >= {minimum}")


def check_at_least_or_null(cfg: Any, names: Sequence[str], minimum: int = 1) -> None:
    """ConfigError naming the first of the optional fields ``names`` set below ``minimum``, with its value."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < minimum:
            raise ConfigError(f"{name} ({value}) must be >= {minimum} or null")


# -- the command line --------------------------------------------------------------


def usage(cls: type, prog: str, description: str) -> str:
    """``--help`` text: the step, then every field with its type, default and docstring."""
    docs = field_docs(cls)
    hints = _hints(cls)
    lines = [f"usage: python -m {prog} --config FILE.json [key=value ...]", "", description.strip(), "", "fields:"]
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = json.dumps(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = json.dumps(f.default_factory())
        else:
            default = "(required)"
        lines.append(f"  {f.name} ({_describe(hints[f.name])}) = {default}")
        if f.name in docs:
            lines.append(f"      {docs[f.name]}")
    return "\n".join(lines) + "\n"


def cli(cls: type[C], run: Callable[[C], Any], argv: Sequence[str] | None = None, *, prog: str, description: str) -> int:
    """Run a step from the command line; print its result as JSON on stdout (rank 0 only under torchrun), and
    write it to ``--result-file FILE`` when given (what a launcher reads back).

    Exit status 0 on success, 2 for a config error, 1 for any other
    ``WorkerError`` (a bad input); the message goes to stderr.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        sys.stdout.write(usage(cls, prog, description))
        return 0
    files: dict[str, str | None] = {"--config": None, "--result-file": None}
    overrides = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in files:
            if i + 1 >= len(args):
                sys.stderr.write(f"error: {arg} needs a file\n")
                return 2
            files[arg] = args[i + 1]
            i += 2
            continue
        if arg.split("=", 1)[0] in files:
            files[arg.split("=", 1)[0]] = arg.split("=", 1)[1]
        elif arg.startswith("--"):
            overrides.append(arg[2:])
        else:
            overrides.append(arg)
        i += 1
    try:
        cfg = load_config(cls, files["--config"], overrides)
        result = run(cfg)
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except WorkerError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    payload = result.to_dict() if hasattr(result, "to_dict") else result
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
        text = json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"
        sys.stdout.write(text)
        if files["--result-file"]:
            from workers.common.metrics import atomic_write_text

            atomic_write_text(files["--result-file"], text)
    return 0
