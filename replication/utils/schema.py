"""Strict config groups: merge a group into its dataclass schema so that an unknown, missing or mistyped key
fails with its full name (STYLE.md habit 9), one implementation for every group that uses it."""
from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (ConfigKeyError, InterpolationResolutionError, MissingMandatoryValue,
                              OmegaConfBaseException, ValidationError)

T = TypeVar("T")


def merge_into_schema(schema_cls: type[T], cfg: Any, group: str, error_cls: type[Exception] = ValueError) -> T:
    """`cfg` (a mapping or a DictConfig node, whose interpolations resolve against the full config it belongs
    to) merged into `schema_cls`; returns the dataclass instance. Free-form dict fields accept any key."""
    if isinstance(cfg, schema_cls):
        return cfg
    base = OmegaConf.structured(schema_cls)
    OmegaConf.set_struct(base, True)
    for f in fields(schema_cls):  # free-form dict fields (e.g. `choices`) take any key
        node = base._get_node(f.name)
        if isinstance(node, DictConfig) and node._metadata.object_type is dict:
            OmegaConf.set_struct(node, False)
    allowed = ", ".join(f.name for f in fields(schema_cls))
    try:
        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        return OmegaConf.to_object(OmegaConf.merge(base, cfg))
    except InterpolationResolutionError as exc:
        raise error_cls(f"{group} config: cannot resolve an interpolation: {exc}") from exc
    except ConfigKeyError as exc:
        raise error_cls(f"unknown key '{exc.full_key}' in {group} config: {exc.msg}. Allowed keys of '{group}': "
                        f"{allowed}") from None
    except MissingMandatoryValue as exc:
        raise error_cls(f"missing required key '{exc.full_key}' in {group} config") from None
    except ValidationError as exc:
        raise error_cls(f"invalid value for '{exc.full_key}' in {group} config: {exc.msg}") from None
    except OmegaConfBaseException as exc:
        raise error_cls(f"invalid {group} config at '{getattr(exc, 'full_key', '?')}': {exc}") from None
