"""Dataclass <-> YAML plumbing: strict loading, dotted overrides, saving.

Kept apart from the schema in ``segr1.config`` so the schema reads as a plain list of settings.
Loading is strict on purpose: an unknown key or a value of the wrong type is a typo in the user's
YAML or command line, and silently ignoring it would run a different experiment than they asked for.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from segr1.core.files import write_atomic

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or out of range."""


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from nested dicts, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where or 'config'}: unknown key(s) {unknown}; known: {sorted(fields)}"
        )
    kwargs = {
        name: _convert(hints[name], value, f"{where}.{name}" if where else name)
        for name, value in data.items()
    }
    try:
        return cls(**kwargs)
    except ValueError as exc:  # the dataclass's own range checks: "field must be ..." names the key
        message = str(exc).removeprefix(f"{cls.__name__}: ")
        if where and message.split(" ", 1)[0] in fields:
            raise ConfigError(f"{where}.{message}") from exc
        raise ConfigError(f"{where or 'config'}: {message}") from exc


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        raise ConfigError(f"{where}: " + "; or ".join(e.removeprefix(f"{where}: ") for e in errors))
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_convert(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "1e-6" (no dot in the mantissa) as a string; it is a learning rate.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected float, got {value!r}") from None
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {tp}")


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain nested dicts (tuples become lists) for YAML or JSON."""
    return _plain(dataclasses.asdict(obj))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``--a.b 3``, ``--a.b=3`` and ``a.b=3`` to a nested dict; values are parsed as YAML scalars."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        key = arg[2:] if arg.startswith("--") else arg
        if "=" in key:
            name, raw = key.split("=", 1)
        elif arg.startswith("--") and i + 1 < len(args):
            name, raw = key, args[i + 1]
            i += 1
        else:
            raise ConfigError(f"override {arg!r}: expected --section.key VALUE or section.key=VALUE")
        pairs.append((name, raw))
        i += 1
    nested: dict[str, Any] = {}
    for name, raw in pairs:
        if not name or any(not part for part in name.split(".")):
            raise ConfigError(f"override {name!r}: empty key")
        node = nested
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {name!r} conflicts with an earlier override")
        node[leaf] = yaml.safe_load(raw) if raw != "" else ""
    return nested


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping at top level")
    return data


def write_yaml(data: dict[str, Any], path: Path) -> None:
    """Write atomically: a half-written resolved config would mislead whoever resumes the run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, yaml.safe_dump(data, sort_keys=False))


@dataclass(frozen=True)
class Alias:
    """A command's short flag for a config key: ``--policy DIR`` is ``--model.path DIR``.

    ``text`` keeps the value a string (paths; YAML would read ``2024`` as a number); ``const``
    makes a switch that sets the key to that value; ``convert`` maps the value first (units)."""

    flag: str
    key: str
    help: str = ""
    text: bool = False
    const: Any = None
    convert: Callable[[str], Any] | None = None


def add_aliases(parser: argparse.ArgumentParser, aliases: list[Alias]) -> None:
    for alias in aliases:
        help_ = f"{alias.help} (= {alias.key})" if alias.help else f"= {alias.key}"
        if alias.const is not None:
            parser.add_argument(alias.flag, dest=alias.key, action="store_const", const=alias.const, default=None,
                                help=help_)
        else:
            parser.add_argument(alias.flag, dest=alias.key, default=None, metavar="VALUE", help=help_)


def alias_overrides(args: argparse.Namespace, aliases: list[Alias]) -> dict[str, Any]:
    """The nested overrides the aliases given on the command line stand for."""
    nested: dict[str, Any] = {}
    for alias in aliases:
        raw = getattr(args, alias.key)
        if raw is None:
            continue
        if alias.const is not None or alias.text:
            value = raw
        elif alias.convert is not None:
            try:
                value = alias.convert(raw)
            except ValueError as exc:
                raise ConfigError(f"{alias.flag} {raw!r}: {exc}") from None
        else:
            value = yaml.safe_load(raw)
        *parents, leaf = alias.key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested
