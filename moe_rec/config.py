"""Typed configs from composed YAML files with dotted command-line overrides.

A config file is YAML whose keys mirror a dataclass tree. It may start with ``include:`` — a list
of other YAML files (paths relative to the including file) merged first, later ones winning —
so experiments compose ``configs/data/*.yaml`` and ``configs/sid/*.yaml``. Overrides such as
``data.source=amazon2014 sid.levels=4`` are applied last; their values are parsed as YAML.

Every key is checked against the dataclass: an unknown key is an error that names the key, the
file it came from and the closest known key; a value of the wrong type names what was expected.
A float field also takes a number that YAML 1.1 reads as text (``1e-3``: no dot in the mantissa).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from moe_rec.errors import MoeRecError

T = TypeVar("T")
_DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")  # what a float field takes as text


class ConfigError(MoeRecError, ValueError):
    """A config file or override that does not fit the config schema."""


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: include cycle through {' -> '.join(str(p) for p in seen)}")
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    merged: dict[str, Any] = {}
    includes = raw.pop("include", []) or []
    if isinstance(includes, str):
        includes = [includes]
    for inc in includes:
        merged = merge(merged, _read_yaml(path.parent / inc, (*seen, path)))
    return merge(merged, raw)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``over`` wins, nested mappings merge key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.subkey=value")
        key, value = item.split("=", 1)
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = parsed
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check (and gently convert, e.g. int -> float) ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {key}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {key}: must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key}: expected a mapping, got {value!r}")
        return _build(tp, value, where, prefix=f"{key}.")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}", where) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-3 (no dot in the mantissa) as a string
    if tp is Path and isinstance(value, (str, Path)):
        return Path(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(tp, type) and not isinstance(value, tp) or (tp in (int, float) and isinstance(value, bool)):
        raise ConfigError(f"{where}: {key}: expected {_type_name(tp)}, got {value!r}")
    return value


def check_keys(keys: typing.Iterable[str], known: typing.Collection[str], prefix: str = "") -> None:
    """Raise :class:`ConfigError` for the first of ``keys`` not in ``known``, naming it (``prefix``
    + key) and the closest known key. Also for a mapping whose keys a dataclass cannot list (e.g.
    ``model.overrides``, keyword arguments of another class), called from its ``__post_init__``."""
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; known keys: {sorted(known)}"
            raise ConfigError(f"unknown key '{prefix}{key}'{hint}")


def _build(cls: type[T], raw: dict[str, Any], where: str, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    try:
        check_keys(raw, fields, prefix)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    kwargs = {name: _coerce(raw[name], hints[name], prefix + name, where) for name in raw}
    try:
        obj = cls(**kwargs)
    except ConfigError as e:  # from __post_init__, already naming its key
        raise ConfigError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {prefix.rstrip('.') or cls.__name__}: {e}") from None
    return obj


def from_dict(cls: type[T], raw: dict[str, Any], where: str = "<config>") -> T:
    """Build a config dataclass from a plain mapping, rejecting unknown keys and wrong types."""
    return _build(cls, raw, where)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Load ``path`` (with its includes), apply dotted ``overrides`` and validate into ``cls``."""
    raw: dict[str, Any] = _read_yaml(Path(path)) if path else {}
    cfg = _build(cls, raw, str(path) if path else "<defaults>")
    if overrides:  # the file is valid on its own, so an error now lies in an override
        cfg = _build(cls, merge(raw, parse_overrides(overrides)), "command-line override")
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as plain YAML-able data (paths as strings)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def dump_config(cfg: Any, path: Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
