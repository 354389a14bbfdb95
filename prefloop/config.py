"""Stage configs: plain dataclasses that parse from a YAML file and from CLI flags (flags win), TRL-style.

Every field carries `metadata={"help": ...}`; a field that does not change a stage's output (output paths, batch
sizes, progress) sets `"hash": False`, so changing it does not count as config drift on resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from prefloop.errors import PrefloopError

T = TypeVar("T")


class ConfigError(PrefloopError, ValueError):
    """A config that cannot work; the message names the key and the fix."""


def field(default: Any = dataclasses.MISSING, help: str = "", hash: bool = True, cli: bool = True,  # noqa: A002
          alias: str | None = None, **kw) -> Any:
    """`dataclasses.field` with the help text and hash flag prefloop's CLI and drift check read. `cli=False`: a
    value prefloop derives itself (e.g. a file's content hash), kept in the config for the drift check, no flag.
    `alias`: another name for the flag and the YAML key, e.g. `--in` for a field that cannot be called `in`."""
    if isinstance(default, (list, dict)):
        kw["default_factory"] = lambda d=default: type(d)(d)
        default = dataclasses.MISSING
    metadata = {"help": help, "hash": hash, "cli": cli, **({"alias": alias} if alias else {})}
    return dataclasses.field(default=default, metadata=metadata, **kw)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def hashed_dict(cfg: Any) -> dict[str, Any]:
    """The fields that define a stage's output (those not marked `hash=False`)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.metadata.get("hash", True)}


def config_hash(values: dict[str, Any]) -> str:
    blob = json.dumps(values, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys whose values differ (recursing into dicts with dotted names)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}" for k in changed_keys(a, b)]
        elif a != b:
            out.append(key)
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found. Fix: check the --config path.") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)}).") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level.")
    return data


def dump_yaml(values: dict[str, Any], header: str = "") -> str:
    body = yaml.safe_dump(values, sort_keys=False, allow_unicode=True)
    return (header + "\n" if header else "") + body


def _base_type(tp: Any) -> tuple[Any, bool]:
    """Strip Optional; return (type, is_optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return tp, False


def _coerce(name: str, tp: Any, value: Any, source: str) -> Any:
    """Coerce a YAML or flag value to the field's type; a comma string becomes a list for list fields."""
    base, optional = _base_type(tp)
    if value is None:
        return None
    origin = typing.get_origin(base)
    try:
        if origin is list or base is list:
            (item,) = typing.get_args(base) or (str,)
            items = value.split(",") if isinstance(value, str) else list(value)
            return [item(x.strip()) if isinstance(x, str) else item(x) for x in items if x != ""]
        if origin is dict or base is dict:
            if not isinstance(value, dict):
                raise TypeError
            return value
        if base is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise TypeError
            return bool(value)
        if base in (int, float, str):
            # No silent cross-type coercion: a list is not a string, a bool is not a number.
            if base is str and not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            if base is int and isinstance(value, float) and not value.is_integer():
                raise TypeError
            return base(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{source}: `{name}` = {value!r} is not a valid {getattr(base, '__name__', base)}."
        ) from None
    return value


def from_dict(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Build `cls` from a mapping, naming unknown keys, bad types and missing required keys."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    aliases = {f.metadata["alias"]: f.name for f in fields.values() if f.metadata.get("alias")}
    values = {aliases.get(k, k): v for k, v in values.items()}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(unknown)} for `{cls.__name__}`. Valid keys: {', '.join(fields)}."
        )
    kwargs = {k: _coerce(k, hints[k], v, source) for k, v in values.items()}
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        flags = ", ".join(f"--{m.replace('_', '-')}" for m in missing)
        raise ConfigError(f"{source}: missing required {flags} (or set it in the --config YAML).")
    return cls(**kwargs)


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add a `--flag` per dataclass field; defaults are suppressed so only flags the user gave override YAML."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("cli", True):
            continue
        base, _ = _base_type(hints[f.name])
        names = [f"--{f.name.replace('_', '-')}"]
        if "_" in f.name:
            names.append(f"--{f.name}")
        if f.metadata.get("alias"):
            names.insert(0, f"--{f.metadata['alias']}")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        if default not in (None, dataclasses.MISSING) and f.default_factory is dataclasses.MISSING:
            help_text += f" (default: {default})"
        if base is bool:
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        elif typing.get_origin(base) is dict or base is dict:
            parser.add_argument(*names, dest=f.name, type=_mapping, default=argparse.SUPPRESS,
                                help=help_text + " (a YAML/JSON mapping)")
        else:
            parser.add_argument(*names, dest=f.name, default=argparse.SUPPRESS, help=help_text)


def from_args(cls: type[T], args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> T:
    """YAML from `--config` (if given), then `overrides`, then the flags the user typed (flags win)."""
    values: dict[str, Any] = {}
    source = "flags"
    if getattr(args, "config", None):
        values.update(load_yaml(args.config))
        source = str(args.config)
    values.update(overrides or {})
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return from_dict(cls, values, source)


def _mapping(text: str) -> dict[str, Any]:
    """A flag's YAML (or JSON) mapping, e.g. `--engine-kwargs '{max_model_len: 4096}'`."""
    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping like '{{key: value}}', got {text!r}")
    return value
