"""Reading config values: YAML with a YAML 1.2 number resolver, typed dataclass filling, dotted overrides.

The bottom layer of ``diffalign.config`` (and of the objectives' hyperparameter parsing): it knows nothing of
the config's sections. Every mistake is a ``ConfigError`` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from diffalign.errors import ConfigError, closest


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading every numeric literal a user writes as a number.

    PyYAML implements YAML 1.1, whose floats need a dot and a signed exponent: ``5e3``, ``1e-4`` and ``1.0e12``
    come back as strings, while YAML 1.2 and every other tool read them as floats. The one extra resolver below
    (a mantissa with an exponent, no dot needed) fixes that; integers, ``1.5`` and the rest resolve as before.
    Used for config files, ``base:`` files and command-line overrides alike.
    """


def _unique_mapping(loader: ConfigLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping whose keys are unique: YAML forbids duplicates, PyYAML keeps the last one silently."""
    seen: dict[Any, yaml.Mark] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key].line + 1}); keep one", key_node.start_mark)
        seen[key] = key_node.start_mark
    return loader.construct_mapping(node, deep=deep)


ConfigLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, where: str) -> Any:
    """YAML text -> Python values with ``ConfigLoader``; a syntax error is a ``ConfigError`` naming ``where``
    (a file, or an override) and the line and column."""
    try:
        return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        position = f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where}:{position} invalid YAML: {problem}") from error


def check_choice(key: str, value: Any, choices: list[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {choices}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check a YAML value against a dataclass field's type. Numbers are read by ``ConfigLoader``; here ints are
    accepted where floats are expected, integral floats (``2e3``) where ints are, and booleans never as numbers."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing), {})  # noqa: S307 - our own annotations only
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item_type,) = typing.get_args(annotation)
        return [_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict or annotation is Any:
        return value
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is float:
        if not is_number:
            raise ConfigError(f"{key} must be a number (e.g. 5000, 5e3 or 1.0e-4), got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if annotation is int:
        if is_number and float(value).is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if annotation is str and not isinstance(value, str):
        if isinstance(value, dict | list) or value is None:
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value


def dataclass_from_dict(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from ``raw``, refusing unknown keys and wrong types with the dotted key name."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise ConfigError(f"unknown config key '{dotted}'.{closest(key, fields)}")
        annotation = hints[key]
        item_type = (typing.get_args(annotation) or [None])[0]
        if dataclasses.is_dataclass(annotation):
            values[key] = dataclass_from_dict(annotation, value or {}, dotted)
        elif typing.get_origin(annotation) is list and dataclasses.is_dataclass(item_type):
            if not isinstance(value, list):
                raise ConfigError(f"{dotted} must be a list, got {value!r}")
            values[key] = [dataclass_from_dict(item_type, item or {}, f"{dotted}[{i}]") for i, item in enumerate(value)]
        else:
            values[key] = _coerce(value, annotation, dotted)
    return cls(**values)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a nested dict."""
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override '{override}' must look like key.sub=value, e.g. train.max_steps=100")
        key, _, text = override.partition("=")
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{override}': '{part}' is not a section")
        node[parts[-1]] = parse_yaml(text, f"override '{override}'") if text.strip() else None
    return raw


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file, with ``base: other.yaml`` (relative to the file) merged underneath it."""
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; see configs/ for examples, e.g. configs/tiny_dpo.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line} is not UTF-8 text (byte {error.object[error.start]:#04x}); "
                          "save the config as UTF-8") from error
    raw = parse_yaml(text, str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: base must be the path of another config file (relative to this one), "
                          f"e.g. 'base: tiny_dpo.yaml', got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in seen:
        raise ConfigError(f"{path}: 'base: {base}' makes a cycle")
    return deep_merge(read_yaml(base_path, (*seen, base_path)), raw)
