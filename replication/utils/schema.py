"""Strict config groups: merge a group into its dataclass schema so that an unknown, missing or mistyped key
fails with its full name (STYLE.md habit 9), one implementation for every group that uses it."""
from __future__ import annotations

import math
from dataclasses import fields, is_dataclass
from enum import Enum
from typing import Any, Mapping, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (ConfigKeyError, InterpolationResolutionError, MissingMandatoryValue,
                              OmegaConfBaseException, ValidationError)

from replication.utils.errors import first_line

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration is invalid; the message names the key and, where known, the allowed values. The one error
    of every config group's validator, so a caller catches one type whichever group was wrong."""


def merge_into_schema(schema_cls: type[T], cfg: Any, group: str, key_prefix: str = "") -> T:
    """`cfg` (a mapping or a DictConfig node, whose interpolations resolve against the full config it belongs
    to) merged into `schema_cls`; returns the dataclass instance. Free-form dict fields accept any key. Every
    float in the result is finite (`check_finite`). An unknown, missing or mistyped key is a ConfigError naming
    it as `key_prefix` + its key inside the group."""
    if isinstance(cfg, schema_cls):
        check_finite(cfg, group)
        return cfg
    result = _merge(schema_cls, cfg, group, key_prefix)
    check_finite(result, group)
    return result


def non_finite_floats(obj: Any, path: str) -> list[str]:
    """`path.key=value` for every NaN or infinite float in `obj` (a dataclass, mapping, list or scalar), in field
    order, nested sections and list items included."""
    if isinstance(obj, bool) or isinstance(obj, Enum):
        return []
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [f"{path}={obj}"]
    if is_dataclass(obj) and not isinstance(obj, type):
        return [bad for f in fields(obj) for bad in non_finite_floats(getattr(obj, f.name), _join(path, f.name))]
    if isinstance(obj, dict):
        return [bad for k, v in obj.items() for bad in non_finite_floats(v, _join(path, str(k)))]
    if isinstance(obj, (list, tuple)):
        return [bad for i, v in enumerate(obj) for bad in non_finite_floats(v, f"{path}[{i}]")]
    return []


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def check_finite(obj: Any, group: str) -> None:
    """Raise ConfigError naming every NaN or infinite float of the config section `obj` (one line): a NaN passes
    every `x <= 0` style range check, and an infinite value fails only deep inside a run. `group` prefixes the
    key names; "<root>" (the top-level keys) adds no prefix."""
    bad = non_finite_floats(obj, "" if group == "<root>" else group)
    if bad:
        raise ConfigError(f"{', '.join(bad)}: config values must be finite numbers (not nan or inf)")


def check_range(value: Any, key: str, low: float | None = None,
                high: float | None = None, low_open: bool = False, high_open: bool = False) -> None:
    """Raise ConfigError naming `key` unless low <= value <= high (strict where `*_open`); None bounds are
    absent. NaN is outside every range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        rule = (f"in {lo}, {hi}" if low is not None and high is not None
                else f"{'>' if low_open else '>='} {low:g}" if low is not None
                else f"{'<' if high_open else '<='} {high:g}")
        raise ConfigError(f"{key} must be {rule}, got {value}")


def _merge(schema_cls: type[T], cfg: Any, group: str, prefix: str) -> T:
    if not isinstance(cfg, (Mapping, DictConfig)):
        raise ConfigError(f"{group} config must be a mapping of keys to values, got {type(cfg).__name__}")
    base = OmegaConf.structured(schema_cls)
    OmegaConf.set_struct(base, True)
    for f in fields(schema_cls):  # free-form dict fields (e.g. `choices`) take any key
        node = base._get_node(f.name)
        if isinstance(node, DictConfig) and node._metadata.object_type is dict:
            OmegaConf.set_struct(node, False)
    allowed = f"Allowed keys of '{group}': {', '.join(f.name for f in fields(schema_cls))}"
    try:
        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        merged = OmegaConf.merge(base, cfg)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"missing required key{'s' if len(missing) > 1 else ''} "
                              f"{', '.join(repr(prefix + key) for key in missing)} in {group} config")
        return OmegaConf.to_object(merged)
    except InterpolationResolutionError as exc:
        raise ConfigError(f"{group} config: cannot resolve an interpolation: {first_line(exc)}") from exc
    except ConfigKeyError as exc:
        section = getattr(exc, "object_type", None)  # the dataclass holding the unknown key, nested or not
        if is_dataclass(section) and section is not schema_cls:
            allowed = f"Allowed keys of {section.__name__}: {', '.join(f.name for f in fields(section))}"
        raise ConfigError(f"unknown key '{prefix}{exc.full_key}' in {group} config: {first_line(exc)}. {allowed}") from None
    except MissingMandatoryValue as exc:
        raise ConfigError(f"missing required key '{prefix}{exc.full_key}' in {group} config") from None
    except ValidationError as exc:
        raise ConfigError(f"invalid value for '{prefix}{exc.full_key}' in {group} config: {first_line(exc)}") from None
    except OmegaConfBaseException as exc:
        where = f"{prefix}{getattr(exc, 'full_key', '?')}"
        raise ConfigError(f"invalid {group} config at '{where}': {first_line(exc)}") from None
