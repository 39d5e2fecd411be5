"""Typed configs: dataclasses loaded from YAML plus ``key=value`` overrides, validated all at once.

Each step defines a dataclass whose fields carry ``metadata={"help": ...}`` and a ``validate()`` method that
returns a list of problems. :func:`config_problems` is the one check every entry point runs before any work
starts (a step's CLI through :func:`load_config`, a KFP component body through :func:`build_config`, and
``vlmtune run/demo/submit/schedule`` for each ``*_config`` section through ``pipelines/params.py``): unknown
keys with a did-you-mean, wrong types, and the dataclass's own ``validate()``. Every problem is a
:class:`Problem` naming its key path and, where known, where the value came from (a file name or the
``--set``/flag that set it); :class:`ConfigError` carries all of them at once.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, TypeVar

import yaml

from components.common import storage

T = TypeVar("T")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input: its key path (``sft_config.learning_rate``; empty for the whole input),
    what is wrong, and where the value came from (``my-run.yaml``, ``--set``, ``--learning-rate``). Shown as
    ``SOURCE: KEY: message`` (``my-run.yaml: sft_config.lora_r must be > 0, got 0``)."""

    key: str
    message: str
    source: str | None = None
    #: Other keys the problem is about ("set num_train_epochs > 0 or max_steps > 0"): their source is named
    #: when the key itself was not set.
    related: tuple[str, ...] = ()

    def __str__(self) -> str:
        parent, _, leaf = self.key.rpartition(".")
        if leaf and re.match(rf"{re.escape(leaf)}\b", self.message):
            body = f"{parent}.{self.message}" if parent else self.message  # validate() style: "lora_r must be > 0"
        elif leaf and repr(leaf) in self.message:
            body = f"{parent}: {self.message}" if parent else self.message  # "unknown key 'lr' (did you mean ...)"
        elif self.key:
            body = f"{self.key}: {self.message}"
        else:
            body = self.message
        return f"{self.source}: {body}" if self.source else body

    def within(self, section: str) -> "Problem":
        """The same problem one level down: key ``lora_r`` of section ``sft_config`` becomes ``sft_config.lora_r``."""
        key = f"{section}.{self.key}" if self.key else section
        return Problem(key, self.message, self.source, tuple(f"{section}.{r}" for r in self.related))

    def sourced(self, sources: Mapping[str, str] | None) -> "Problem":
        """The problem with its source looked up in ``sources`` (key path -> where it was set) unless it has one:
        a related key's entry (the keys the message names were set together), else the key's own, else the key's
        nearest parent's."""
        if self.source or not sources:
            return self
        for path in (*self.related, self.key):
            if path in sources:
                return dataclasses.replace(self, source=sources[path])
        return dataclasses.replace(self, source=source_of(self.key, sources))


def source_of(key: str, sources: Mapping[str, str] | None) -> str | None:
    """Where ``key`` (a dotted path) was set: its own entry in ``sources``, else its nearest parent's."""
    if not sources:
        return None
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        found = sources.get(".".join(parts[:end]))
        if found:
            return found
    return None


def format_problems(title: str, problems: Iterable[Problem | str]) -> str:
    """One problem: ``title: problem`` on one line. Several: ``title (N problems):`` and one per line."""
    lines = [str(p) for p in problems]
    if len(lines) == 1:
        return f"{title}: {lines[0]}"
    return f"{title} ({len(lines)} problems):\n  - " + "\n  - ".join(lines)


class ConfigError(ValueError):
    """A config is invalid. The message lists every problem, with its key and where it was set."""

    def __init__(self, message: str | None = None, problems: list[Problem] | None = None, *, title: str = "invalid config"):
        self.problems = list(problems or ([Problem("", message)] if message else []))
        super().__init__(message if message and not problems else format_problems(title, self.problems))


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """The choice ``word`` most likely misspells (``learnin_rate`` -> ``learning_rate``), or None."""
    choices = list(choices)
    squashed = {c.replace("_", ""): c for c in choices}
    key = word.replace("-", "_")
    if key.replace("_", "") in squashed:
        return squashed[key.replace("_", "")]
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.75)
    return close[0] if close else None


def unknown_key_problem(key: str, known: Iterable[str], noun: str = "key") -> Problem:
    known = sorted(known)
    guess = did_you_mean(key, known)
    hint = f"did you mean {guess!r}?" if guess else f"known: {', '.join(known)}"
    return Problem(key, f"unknown {noun} {key!r} ({hint})")


def _coerce(value: Any, annotation: Any, name: str, problems: list[Problem]) -> Any:
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
        problems.append(Problem(name, f"expected true/false, got {value!r}"))
        return value
    if annotation in (int, float):
        if isinstance(value, bool):
            problems.append(Problem(name, f"expected a number, got {value!r}"))
            return value
        try:
            number = annotation(value)
        except (TypeError, ValueError):
            problems.append(Problem(name, f"expected {'an integer' if annotation is int else 'a number'}, got {value!r}"))
            return value
        if annotation is int and isinstance(value, float) and value != number:
            problems.append(Problem(name, f"expected an integer, got {value!r}"))
        return number
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            problems.append(Problem(name, f"expected a string, got {value!r}"))
            return value
        return str(value)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            problems.append(Problem(name, f"expected a list, got {value!r}"))
            return value
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{name}[{i}]", problems) if inner is not Any else v for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                problems.append(Problem(name, f"expected a mapping (YAML/JSON), got {value!r}"))
                return value
        if not isinstance(value, dict):
            problems.append(Problem(name, f"expected a mapping, got {value!r}"))
        return value
    return value


def _validate_problem(text: str, fields: Iterable[str]) -> Problem:
    """A ``validate()`` line as a Problem, keyed by the field it starts with (``"lora_r must be > 0"``), and
    related to the other fields it names."""
    fields = set(fields)
    match = re.match(r"([A-Za-z_][A-Za-z0-9_]*)\b", text)
    key = match.group(1) if match and match.group(1) in fields else ""
    if key and text[len(key):].startswith(":"):
        text = text[len(key) + 1:].strip()  # "preset: unknown preset" -> key preset, "unknown preset"
    related = tuple(dict.fromkeys(w for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text) if w in fields and w != key))
    return Problem(key, text, related=related)


def config_problems(cls: type[T], values: Mapping[str, Any], sources: Mapping[str, str] | None = None
                    ) -> tuple[list[Problem], T | None]:
    """(every problem, the config or None) for ``cls`` built from ``values``: unknown keys (with a did-you-mean),
    values of the wrong type, then ``cls.validate()``. ``sources`` maps keys to where they were set, for the
    messages. This is the check every entry point runs; :func:`build_config` raises on its problems."""
    problems: list[Problem] = []
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            problems.append(unknown_key_problem(key, fields))
            continue
        found: list[Problem] = []
        typed = _coerce(value, hints[key], key, found)
        if found:
            problems += found
        else:
            kwargs[key] = typed
    # validate() runs on the well-typed values even when others are wrong, so every problem shows at once.
    config = cls(**kwargs)
    validate = getattr(config, "validate", None)
    badly_typed = {p.key.partition("[")[0] for p in problems}
    problems += [p for p in (_validate_problem(text, fields) for text in (validate() if validate else []))
                 if p.key not in badly_typed]
    problems = [p.sourced(sources) for p in problems]
    return problems, (None if problems else config)


def build_config(cls: type[T], values: Mapping[str, Any], sources: Mapping[str, str] | None = None) -> T:
    """Build and validate ``cls`` from a plain mapping. Raises ConfigError listing every problem."""
    problems, config = config_problems(cls, values, sources)
    if problems:
        raise ConfigError(problems=problems, title=f"invalid {cls.__name__}")
    return config


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["lr=1e-3", "lora_r=8"]`` -> dict; values parsed as YAML scalars (so numbers and bools work)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, value = parse_override(pair)
        out[key] = value
    return out


def parse_override(pair: str) -> tuple[str, Any]:
    """``"lr=1e-3"`` -> ``("lr", 0.001)``: the value parsed as a YAML scalar (numbers and bools work)."""
    key, sep, raw = pair.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {pair!r} is not KEY=VALUE (e.g. --set learning_rate=5e-3)")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw  # "a: b" and the like: taken as the string it is
    return key.strip().replace("-", "_"), value


def read_yaml_mapping(path: str, what: str = "config file") -> dict[str, Any]:
    """The mapping in a YAML file (local or gs://); ConfigError naming the file when it is missing, not YAML,
    or not a mapping."""
    try:
        loaded = yaml.safe_load(storage.read_text(path))
    except FileNotFoundError as e:
        raise ConfigError(f"{what} {path!r} does not exist") from e
    except IsADirectoryError as e:
        raise ConfigError(f"{what} {path!r} is a folder; expected a YAML file") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path!r} is not valid YAML: {e}") from e
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} {path!r} must hold a mapping of keys to values, not a {type(loaded).__name__}")
    return loaded


def load_config(cls: type[T], path: str | None = None, overrides: dict[str, Any] | None = None,
                sources: Mapping[str, str] | None = None) -> T:
    """YAML file (local or gs://) merged with overrides (overrides win), then validated. ``sources`` names where
    each override came from (``--set lr=1``, ``--learning-rate``); keys from the file are named by the file."""
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if path:
        values.update(read_yaml_mapping(path))
        origin.update({k: path for k in values})
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    values.update(given)
    origin.update({k: (sources or {}).get(k) for k in given if (sources or {}).get(k)})
    for k in given:
        if k not in (sources or {}) and origin.get(k) == path:
            origin.pop(k)  # an override without a named source: not from the file any more
    return build_config(cls, values, origin)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
