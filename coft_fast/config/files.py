"""Setting fields by dotted key, the value checked against the field's type; YAML files; removed keys."""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from typing import Any, Dict, List, Tuple, Union

import yaml


class ConfigError(ValueError):
    """A configuration key, value or file is invalid; the message names it."""


# Keys that no longer exist: (the values that meant "off", which a saved run config may still carry and
# which are ignored; what to use instead). Any other value, and any --set of the key, is an error.
REMOVED_KEYS: Dict[str, Tuple[Tuple[Any, ...], str]] = {
    "pseudo.knn_refine": ((False,), "use pseudo.refine=knn (or none, or transclip)"),
    "phase1.train_on": (("s_star", "auto"), "phase I always trains on S*, the class-balanced top-K (the paper's)"),
    "phase1.selection_warmup_epochs": ((1,), "it served only the phase1.train_on pool modes, which were removed "
                                             "(phase I always trains on S*)"),
    "phase1.complement_hard_weight": ((0.0,), "L2's complement label is always drawn uniformly from the other "
                                              "classes (the paper's)"),
    "phase2.sample_weight": (("none",), "phase II weighs every kept sample alike (the paper's)"),
    "phase2.relabel_issues": ((False,), "phase II trains on the kept labels only (DeFT's choice); the flagged "
                                        "images are listed in label_issues.csv"),
    "phase2.knn_monitor": ((False,), "the phase II kNN monitor was removed (no replacement)"),
    "phase2.knn_k": ((20,), "it served only phase2.knn_monitor, which was removed (pseudo.knn_k is the kNN label "
                            "refinement's k)"),
}


def check_removed(key: str, value: Any, explicit: bool) -> bool:
    """True when ``key`` was removed and ``value`` is a saved config's old off value; an error when set otherwise."""
    if key not in REMOVED_KEYS:
        return False
    offs, instead = REMOVED_KEYS[key]
    # true/false never stand for 1/0 (or the reverse); an int stands for the equal float
    if not explicit and any(isinstance(value, bool) == isinstance(off, bool) and value == off for off in offs):
        return True
    raise ConfigError(f"config key {key!r} was removed: {instead}")


def _parse_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def set_value(cfg: Any, dotted_key: str, value: Any) -> None:
    """Set a (possibly nested) field, checking the key exists and the value has the field's type."""
    check_removed(dotted_key, value, explicit=True)  # a removed key given explicitly is an error
    parts = dotted_key.split(".")
    target = cfg
    for depth, name in enumerate(parts):
        if not dataclasses.is_dataclass(target):
            raise ConfigError(f"unknown config key {dotted_key!r}: {'.'.join(parts[:depth])} is not a section")
        types_ = typing.get_type_hints(type(target))
        if name not in types_:
            where = ".".join(parts[:depth]) or "the top level"
            raise ConfigError(f"unknown config key {dotted_key!r}: {where} has no field {name!r} "
                              f"(known: {', '.join(sorted(types_))})")
        if depth == len(parts) - 1:
            current = getattr(target, name)
            if dataclasses.is_dataclass(current):
                if not isinstance(value, dict):
                    raise ConfigError(f"config key {dotted_key!r} is a section: give a mapping, got {value!r}")
                _update(cfg, value, prefix=dotted_key + ".")
            else:
                setattr(target, name, _coerce(value, types_[name], dotted_key))
        else:
            target = getattr(target, name)


def _update(cfg: Any, data: Dict[str, Any], prefix: str) -> None:
    """Set each key of ``data`` under the section ``prefix`` ("" or "phase1.") of ``cfg``."""
    for key, value in data.items():
        if not check_removed(prefix + str(key), value, explicit=False):
            set_value(cfg, prefix + str(key), value)


EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"config key {key!r} got {value!r}")
    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} expects a list, got {value!r}")
        return [_coerce(item, args[0], key) for item in value] if args else list(value)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is bool and isinstance(value, bool):
        return value
    if annotation is int and number and isinstance(value, int):
        return value
    if annotation is float and (number or _is_number_text(value)):
        return float(value)
    if annotation is str and (number or isinstance(value, str)):
        return str(value)
    if annotation in EXPECTED:
        raise ConfigError(f"config key {key!r} expects {EXPECTED[annotation]}, got {value!r}")
    return value


def _is_number_text(value: Any) -> bool:
    """A string that reads as a finite number: YAML 1.1 reads "2e-3" (no dot) as a string."""
    try:
        return isinstance(value, str) and math.isfinite(float(value))
    except ValueError:
        return False


def read_yaml(path: Union[str, os.PathLike], what: str) -> Any:
    """What the YAML file ``path`` holds; a ConfigError calling it ``what`` when it is missing or not YAML."""
    try:
        with open(path, "r", encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from None


def apply_file(cfg, path: Union[str, os.PathLike]):
    """Apply a YAML config file over ``cfg`` (the file's keys win); returns ``cfg``."""
    data = read_yaml(path, "config file")
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    try:
        _update(cfg, data, prefix="")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return cfg
