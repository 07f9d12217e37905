"""Typed configs: dataclasses with documented fields, built from dicts, YAML files and `key=value`.

Every config in moekit is a dataclass whose fields carry a docstring (a string right below the
field, as in nanoGPT's and Hugging Face's configs). `documented` turns those into the class's
`help()` text and into `--help` lines, so a field is documented once. `build_dataclass` makes a
config from a plain dict (a YAML file, a `config.json`), checking every key and type, and naming
the key and the value when one is wrong; `apply_overrides` layers `a.b=value` strings on a dict.

Validation of ranges lives in each dataclass's `__post_init__`, with the helpers below, so a bad
value fails at construction with the field and the value in the message.

This module needs only the standard library (PyYAML is imported where a file is read).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import textwrap
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# --- field documentation --------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """{field name: docstring} from the string literals right below each field, base classes first."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # no source (frozen apps): no docs, nothing breaks
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, after in zip(body, body[1:] + [None], strict=True):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def describe_default(f: dataclasses.Field) -> str:
    """A field's default as a user would type it (`None`, `4`, `'auto'`, `[]`)."""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(value):
            return f"{type(value).__name__}()"
    else:
        return "required"
    return "null" if value is None else repr(value)


def documented(cls: type) -> type:
    """Class decorator: append each field's type, default and docstring to the class docstring,
    so `help(MoEConfig)` lists what every field means."""
    docs = field_docs(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        hint = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        lines.append(f"    {f.name}: {hint} = {describe_default(f)}")
        if docs.get(f.name):
            lines.extend(textwrap.wrap(docs[f.name], 96, initial_indent=" " * 8, subsequent_indent=" " * 8))
    cls.__doc__ = (inspect.cleandoc(cls.__doc__ or "") + "\n\nFields:\n" + "\n".join(lines)).strip()
    return cls


# --- building configs from dicts ------------------------------------------------------------


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it."""


def config_dict(config: Any) -> dict:
    """A dataclass config as a JSON-safe dict (tuples become lists)."""
    return json_safe(dataclasses.asdict(config))


def json_safe(value: Any) -> Any:
    """`value` with tuples as lists and paths as strings, for JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def build_dataclass(cls: type, data: Any, where: str = "config") -> Any:
    """Construct dataclass `cls` from a dict, checking keys and value types recursively.

    Unknown keys and values of the wrong type raise `ConfigError` naming `where.key` and the value;
    range checks are the dataclass's own (its `__post_init__`), and their errors get `where` too.
    """
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; "
                          f"expected some of {', '.join(names)}")
    hook = getattr(cls, "_prepare_config_dict", None)
    if hook is not None:  # e.g. an LM's MoE layers take the model's width unless told otherwise
        data = hook(dict(data))
    kwargs = {k: coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{where}: {error}") from error


def coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` checked against the type `hint` (and converted where lossless: 3.0 -> 3, 1 -> 1.0)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        raise ConfigError(f"{where}={value!r} is not any of {_hint_name(hint)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {', '.join(map(repr, args))} (got {value!r})")
        return value
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, where)
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list (got {value!r})")
        item_hint = args[0] if args else Any
        items = [coerce(v, item_hint, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping (got {value!r})")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false (got {value!r})")
        return value
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer (got {value!r})")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number (got {value!r})")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string (got {value!r})")
        return value
    return value


def _hint_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("NoneType", "None")


# --- YAML files and overrides ---------------------------------------------------------------


def parse_value(text: str) -> Any:
    """A `key=value` override's value, read as YAML (`1e-3` is a number, `null` is None)."""
    import yaml

    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            return float(value) if value.lower() not in ("nan", "inf", "-inf", "infinity") else value
        except ValueError:
            pass
    return value


def apply_overrides(data: dict, overrides: Iterable[str], default_section: str | None = None,
                    sections: Iterable[str] = ()) -> dict:
    """`data` with `a.b=value` overrides set in place. A key whose first part is not a section
    goes into `default_section` (so `lr=1e-3` means `train.lr=1e-3`)."""
    sections = set(sections)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.lr=1e-3)")
        parts = key.split(".")
        if default_section is not None and parts[0] not in sections:
            parts = [default_section, *parts]
        set_path(data, parts, parse_value(text))
    return data


def set_path(data: dict, parts: list[str], value: Any) -> None:
    """data[a][b][c] = value for parts [a, b, c], creating the mappings on the way."""
    target = data
    for part in parts[:-1]:
        if not isinstance(target.get(part), dict):
            target[part] = {}
        target = target[part]
    target[parts[-1]] = value


def read_yaml(path: str | Path) -> dict:
    """A YAML file holding a mapping; a missing or malformed file names itself (and the line)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"config file {path}{line}: not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
    return data


# --- range checks for __post_init__ ---------------------------------------------------------


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> None:
    """An int (not a bool, not 2.5, not "2") within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer (got {value!r})")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum} (got {value})")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be <= {maximum} (got {value})")


def check_number(name: str, value: Any, minimum: float | None = None, maximum: float | None = None, *,
                 strict_min: bool = False, strict_max: bool = False) -> None:
    """A finite real number within the given bounds (strict: the bound itself is excluded)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number (got {value!r})")
    if minimum is not None and (value < minimum or (strict_min and value == minimum)):
        raise ConfigError(f"{name} must be {'>' if strict_min else '>='} {minimum} (got {value})")
    if maximum is not None and (value > maximum or (strict_max and value == maximum)):
        raise ConfigError(f"{name} must be {'<' if strict_max else '<='} {maximum} (got {value})")


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> None:
    """`value` is one of `allowed`."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, allowed))} (got {value!r})")
