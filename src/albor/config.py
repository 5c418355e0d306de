"""Typed configs: the base model every stage config extends, YAML loading, `--set` overrides and
shorthand numbers (`32K` = 32768, `1M` = 1048576, `10B` = 10**10, `3e-4`).

Every error names the file, the key path and the fix, and is raised as `ConfigError` (exit 2).
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from albor.errors import ConfigError

M = TypeVar("M", bound=BaseModel)

# K/M/G are binary (model dimensions, vocab sizes); B/T are decimal (token and parameter counts).
_SUFFIX = {"K": 1024, "M": 1024**2, "G": 1024**3, "B": 10**9, "T": 10**12}
_SHORTHAND = re.compile(r"^\s*([0-9][0-9_]*(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)\s*([KMGBT]?)\s*$")


def parse_int(value: Any) -> Any:
    """Turn `32K`, `1M`, `10B`, `1.5K`, `1e6`, `32_768` into an int; leave the rest to pydantic.

    A value that is not a whole number after scaling (`0.5K` = 512 is, `1.0001K` is not)
    is left unchanged so that pydantic reports it with the key path.
    """
    if isinstance(value, bool) or not isinstance(value, (str, float)):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    m = _SHORTHAND.match(value)
    if not m:
        return value
    number = float(m.group(1).replace("_", ""))
    scaled = number * _SUFFIX.get(m.group(2), 1)
    if not math.isfinite(scaled) or not scaled.is_integer():
        return value
    return int(scaled)


Int = Annotated[int, BeforeValidator(parse_int)]
"""An int field that accepts shorthand values (`32K`, `10B`, `1e6`)."""


class StageConfig(BaseModel):
    """Base of every config: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _format_loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def _field_names(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names valid at the parent of `loc`, for a 'did you mean' hint."""
    current: Any = model
    for item in loc[:-1]:
        if isinstance(item, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or item not in fields:
            return []
        annotation = fields[item].annotation
        current = _model_in(annotation)
        if current is None:
            return []
    fields = getattr(current, "model_fields", None)
    return list(fields) if fields else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def describe_validation_error(err: ValidationError, model: type[BaseModel], source: str) -> str:
    """One line per problem: `source: key.path: what is wrong (fix)`."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = _format_loc(loc)
        if e["type"] == "extra_forbidden":
            valid = _field_names(model, loc)
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
            lines.append(f"{source}: {where}: unknown key ({hint})")
        elif e["type"] == "missing":
            lines.append(f"{source}: {where}: required key is missing (add it)")
        else:
            got = e.get("input")
            shown = repr(got) if not isinstance(got, dict) else "a mapping"
            lines.append(f"{source}: {where}: {e['msg']} (got {shown})")
    return "\n".join(lines)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file, a parse error or a non-mapping is a ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found (check the path)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}:{where}: invalid YAML: {problem}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of keys to values, got {type(data).__name__}"
        )
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply `a.b=value` overrides; the value is parsed as a YAML scalar and typed by the schema.

    A number indexes a list: `tasks.0.limit=10` sets `limit` in the first task."""
    out = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=3e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node: Any = out
        parts = key.strip().split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                # A list item by its index: `--set tasks.1.n=20`.
                where = ".".join(parts[:depth]) or "the config"
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(
                        f"--set {item!r}: {where} is a list of {len(node)}; index it with "
                        f"0..{len(node) - 1}, not '{part}'"
                    )
                index = int(part)
                if last:
                    node[index] = value
                else:
                    node = node[index]
                continue
            if not isinstance(node, dict):
                where = ".".join(parts[:depth])
                raise ConfigError(
                    f"--set {item!r}: '{where}' is not a mapping or list, cannot set a key in it"
                )
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return out


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def validate(model: type[M], data: dict[str, Any], source: str) -> M:
    """Validate `data` against `model`, as a ConfigError naming `source`."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e, model, source)) from None


def load_config(model: type[M], path: Path, overrides: list[str] | tuple[str, ...] = ()) -> M:
    """Load a YAML config file into `model`, applying `--set` overrides first."""
    data = apply_overrides(read_yaml(path), overrides)
    return validate(model, data, str(path))
