"""Typed configs: dataclasses loaded from YAML plus ``key=value`` overrides, validated all at once.

Each step defines a dataclass whose fields carry ``metadata={"help": ...}`` and a ``validate()`` method that
returns a list of problems. :func:`load_config` reports *every* problem in one error, before any work starts.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

import yaml

from components.common import storage

T = TypeVar("T")


class ConfigError(ValueError):
    """A config is invalid. The message lists every problem and how to fix it."""


def _coerce(value: Any, annotation: Any, name: str, problems: list[str]) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], name, problems) if len(non_none) == 1 else value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        problems.append(f"{name}: expected true/false, got {value!r}")
        return value
    if annotation in (int, float):
        if isinstance(value, bool):
            problems.append(f"{name}: expected a number, got {value!r}")
            return value
        try:
            number = annotation(value)
        except (TypeError, ValueError):
            problems.append(f"{name}: expected {annotation.__name__}, got {value!r}")
            return value
        if annotation is int and isinstance(value, float) and value != number:
            problems.append(f"{name}: expected an integer, got {value!r}")
        return number
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            problems.append(f"{name}: expected a string, got {value!r}")
            return value
        return str(value)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            problems.append(f"{name}: expected a list, got {value!r}")
            return value
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{name}[{i}]", problems) if inner is not Any else v for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                problems.append(f"{name}: expected a mapping (YAML/JSON), got {value!r}")
                return value
        if not isinstance(value, dict):
            problems.append(f"{name}: expected a mapping, got {value!r}")
        return value
    return value


def build_config(cls: type[T], values: dict[str, Any]) -> T:
    """Build and validate ``cls`` from a plain mapping. Raises ConfigError listing every problem."""
    problems: list[str] = []
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            close = [n for n in fields if n.replace("_", "") == key.replace("_", "").replace("-", "")]
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(sorted(fields))}"
            problems.append(f"unknown key {key!r}{hint}")
            continue
        kwargs[key] = _coerce(value, hints[key], key, problems)
    if problems:
        raise ConfigError(f"invalid {cls.__name__}:\n  - " + "\n  - ".join(problems))
    config = cls(**kwargs)
    validate = getattr(config, "validate", None)
    problems.extend(validate() if validate else [])
    if problems:
        raise ConfigError(f"invalid {cls.__name__}:\n  - " + "\n  - ".join(problems))
    return config


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["lr=1e-3", "lora_r=8"]`` -> dict; values parsed as YAML scalars (so numbers and bools work)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise ConfigError(f"override {pair!r} is not KEY=VALUE (e.g. --set learning_rate=5e-3)")
        out[key.strip().replace("-", "_")] = yaml.safe_load(raw) if raw else ""
    return out


def load_config(cls: type[T], path: str | None = None, overrides: dict[str, Any] | None = None) -> T:
    """YAML file (local or gs://) merged with overrides (overrides win), then validated."""
    values: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(storage.read_text(path)) or {}
        except FileNotFoundError as e:
            raise ConfigError(f"config file {path!r} does not exist") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping of keys to values, not {type(loaded).__name__}")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return build_config(cls, values)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
