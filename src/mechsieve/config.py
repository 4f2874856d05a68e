"""Typed configuration: dataclasses in, YAML and `key=value` overrides on top.

Every command's settings are a dataclass (fields with docstrings in the class, `Literal` for
choices, checks in `__post_init__`). YAML enters only through `--config`; `--set a.b=value`
overrides one field, the value parsed as YAML (`--set capture.layers=[1,2]`). `describe_settings`
lists a config's fields with types, defaults and docstrings (`mechsieve methods NAME`); `to_yaml`
writes one back as `--config` reads it (`--print-config`).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting is unknown or has a value its field does not allow."""


def check_choice(field: str, value: Any, allowed: typing.Iterable[Any]) -> None:
    """Raise a ConfigError naming `field` when `value` is not one of `allowed`."""
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{field}={value!r} is not allowed; choose one of {allowed}")


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    """'; did you mean X?' for the closest of `choices` to a mistyped `word`, else ''."""
    import difflib

    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def check_settings(cls: type, data: Any, prefix: str, owner: str) -> None:
    """Refuse a key of the mapping `data` that dataclass `cls` has no field for (nested sections
    too), naming the key as the user wrote it (`prefix` + key), `owner` (what the settings are
    for, e.g. a method's name), its settings and the closest one. Values are checked by
    `from_dict`; this only gives an unknown key the clearest message."""
    if not isinstance(data, dict) or not dataclasses.is_dataclass(cls):
        return
    hints = get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: {owner} has no setting {key}; its settings are: "
                              f"{', '.join(fields)}{did_you_mean(str(key), fields)}")
        check_settings(hints[key], value, f"{prefix}{key}.", f"{owner}'s {key} section")


def check_positive(field: str, value: float | int, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{field}={value!r} must be {bound}")


def _coerce(path: str, tp: Any, value: Any) -> Any:
    """Turn a YAML value into the declared type `tp`, or raise naming `path`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(path, arg, value)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{path}: {value!r} fits none of {tp}: " + "; ".join(errors))
    if origin is Literal:
        check_choice(path, value, get_args(tp))
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=path + ".")
    if origin in (list, tuple, typing.Sequence):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(f"{path}[{i}]", item_tp, v) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {_coerce(path, key_tp, k): _coerce(f"{path}.{k}", val_tp, v) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            # YAML turns `--set name=123` into an int; a string field still wants "123".
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if tp is Path:
        return Path(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a (nested) mapping; unknown keys are refused by name."""
    if data is None:
        data = {}
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        hint = did_you_mean(prefix + str(unknown[0]), [prefix + k for k in fields]) if len(unknown) == 1 else ""
        raise ConfigError(
            f"unknown setting(s) {', '.join(prefix + str(k) for k in unknown)}; "
            f"{cls.__name__} has: {', '.join(prefix + k for k in fields)}{hint}"
        )
    kwargs = {k: _coerce(prefix + k, hints[k], v) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as err:
        raise ConfigError(f"{cls.__name__}: {err}") from err


def to_dict(obj: Any) -> Any:
    """A dataclass (or nested value) as plain JSON-able data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring of each field of dataclass `cls` (the string literal right after the field in
    the class body, inherited ones included), cleaned as `inspect.cleandoc` does; a field without
    one, or a class whose source is not available, has none."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


class Setting(NamedTuple):
    """One field of a config dataclass, as `describe_settings` lists it."""

    key: str
    """Dotted path, as `--set` takes it (`render.max_len`)."""
    type: str
    """The annotation as written in the class (`list[int] | Literal['all']`)."""
    default: Any
    """The default value; `dataclasses.MISSING` for a required field, None for a section."""
    doc: str
    """The field's docstring ('' when it has none)."""
    section: bool
    """True for a nested config dataclass, whose own fields follow it."""


def describe_settings(cls: type, prefix: str = "") -> list[Setting]:
    """Every field of config dataclass `cls`, the fields of nested config dataclasses right after
    their section (keys dotted), in declaration order."""
    hints = get_type_hints(cls)
    docs = field_docs(cls)
    out: list[Setting] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        shown = f.type if isinstance(f.type, str) else inspect.formatannotation(f.type, cls.__module__)
        if dataclasses.is_dataclass(hints[f.name]):
            out.append(Setting(prefix + f.name, shown, None, docs.get(f.name, ""), True))
            out.extend(describe_settings(hints[f.name], f"{prefix}{f.name}."))
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out.append(Setting(prefix + f.name, shown, default, docs.get(f.name, ""), False))
    return out


def to_yaml(cfg: Any) -> str:
    """A config (or its `to_dict`) as YAML that `load_config` reads back to the same config."""
    data = cfg if isinstance(cfg, dict) else to_dict(cfg)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `data['a']['b'] = value` for `dotted='a.b'`, creating mappings on the way."""
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`'a.b=[1, 2]'` -> `('a.b', [1, 2])`; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set capture.max_tokens=4096")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: the key before '=' is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(
    cls: type[T],
    config_file: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
    flags: dict[str, Any] | None = None,
) -> T:
    """Settings of `cls`: defaults, then the YAML file, then command-line flags (dotted keys), then
    `--set key=value` overrides; later wins."""
    data: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.exists():
            raise ConfigError(f"--config {path}: no such file")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"--config {path}: not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: expected a mapping at the top, got {type(loaded).__name__}")
        _merge(data, loaded)
    for key, value in (flags or {}).items():
        set_path(data, key, value)
    for text in overrides:
        key, value = parse_override(text)
        set_path(data, key, value)
    return from_dict(cls, data)


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
