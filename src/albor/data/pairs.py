"""Docstring -> body pairs for instruction finetuning: mined from Python source with `ast`, or read
from JSONL records. Pure functions over strings; the `pairs` stage does the reading and writing.

A pair is cut from a function that has a docstring (methods and nested functions included):
the prompt is the source from the function's first decorator (or its `def`) through the last
line of its docstring, newline included; the completion is the rest of the function, through its
last line. Both are exact slices of the source, indentation kept, so `prompt + completion` is the
function as written (plus a final newline when the file lacks one) and a model is trained on code
exactly as people indent it. Cutting at line boundaries keeps a method's pair parseable once
dedented.

A function gives no pair, for a counted reason, when it has no docstring, nothing after it, a
stub after it (`pass`, `...`, `raise NotImplementedError`: nothing to learn from), or its body on
the docstring's own line (`def f(): "doc"; return 1`, which no line cut can split). A file that
does not parse (a syntax error, NUL bytes, nesting too deep for the parser) gives none at
all and is counted once.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from albor.errors import ArtifactError

# The pairs corpus: one row per pair. `meta` is the JSON object of a JSONL record's other keys
# (null for mined pairs); `lineno` is the function's first line, or the record's line.
SCHEMA = pa.schema(
    [
        ("prompt", pa.large_string()),
        ("completion", pa.large_string()),
        ("path", pa.string()),
        ("name", pa.string()),
        ("lineno", pa.int64()),
        ("split", pa.string()),
        ("sha256", pa.string()),
        ("meta", pa.string()),
    ]
)

# The columns a consumer of a pairs artifact reads (a split artifact's text files lack them).
PAIR_COLUMNS = ("prompt", "completion")

# Why a function, file or record gave no pair.
NO_DOCSTRING = "no_docstring"
DOCSTRING_ONLY = "docstring_only"
STUB_BODY = "stub_body"
INLINE_BODY = "inline_body"
UNPARSABLE_FILE = "unparsable_file"
PROMPT_TOO_LONG = "prompt_too_long"
COMPLETION_TOO_LONG = "completion_too_long"
COMPLETION_TOO_SHORT = "completion_too_short"
DUPLICATE = "duplicate"
CONTAMINATED = "contaminated"
JSONL_NOT_UTF8 = "jsonl_not_utf8"
JSONL_NOT_JSON = "jsonl_not_json"
JSONL_NOT_OBJECT = "jsonl_not_object"
JSONL_MISSING_KEY = "jsonl_missing_key"
JSONL_NOT_TEXT = "jsonl_not_text"
JSONL_EMPTY = "jsonl_empty"

# Python ends a line at \r\n, \r or \n, and nowhere else (str.splitlines also splits at \f,
# \x1c, \u2028, ..., which would shift every line number after one).
_NEWLINE = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class Pair:
    prompt: str
    completion: str
    name: str  # qualified as __qualname__ spells it: Class.method, outer.<locals>.inner
    lineno: int  # of the first decorator, or of the def

    @property
    def text(self) -> str:
        return self.prompt + self.completion

    @property
    def sha256(self) -> str:
        return pair_sha256(self.prompt, self.completion)


@dataclass
class Mined:
    """What one source file gave: its pairs, in source order, and every function that gave none,
    by reason. `error` is set (and nothing else) when the file does not parse."""

    pairs: list[Pair] = field(default_factory=list)
    functions: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


def pair_sha256(prompt: str, completion: str) -> str:
    return hashlib.sha256((prompt + completion).encode("utf-8")).hexdigest()


def parse(source: str) -> ast.Module:
    """`ast.parse`, without the SyntaxWarnings of odd escapes (`"\\d"`) that the corpus is full of
    (and that a `-W error` run would turn into failures)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ast.parse(source)


def _functions(tree: ast.Module) -> list[tuple[ast.FunctionDef | ast.AsyncFunctionDef, str]]:
    """Every function of a module with its qualified name, in source order. Iterative, so a deeply
    nested module that `ast.parse` accepted cannot exhaust the stack here."""
    found: list[tuple[ast.FunctionDef | ast.AsyncFunctionDef, str]] = []
    stack: list[tuple[ast.AST, str]] = [(tree, "")]
    while stack:
        node, prefix = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = prefix + child.name
                found.append((child, name))
                stack.append((child, name + ".<locals>."))
            elif isinstance(child, ast.ClassDef):
                stack.append((child, prefix + child.name + "."))
            else:
                stack.append((child, prefix))
    found.sort(key=lambda item: (item[0].lineno, item[0].col_offset))
    return found


def _is_stub(stmt: ast.stmt) -> bool:
    if isinstance(stmt, ast.Pass):
        return True
    if isinstance(stmt, ast.Expr):
        return isinstance(stmt.value, ast.Constant) and stmt.value.value is Ellipsis
    if isinstance(stmt, ast.Raise) and stmt.exc is not None:
        exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def _docstring(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> ast.Expr | None:
    first = fn.body[0]
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        return first
    return None


def mine(source: str) -> Mined:
    """The docstring -> body pairs of one Python source text (see the module docstring)."""
    mined = Mined()
    try:
        tree = parse(source)
        functions = _functions(tree)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        # ValueError: NUL bytes before Python 3.12. RecursionError and MemoryError: very deep
        # nesting (`a.b.b.b...` overflows the AST builder, `- - - ... 1` the parser's own stack,
        # which 3.11 reports as MemoryError); either way one odd file, not the machine.
        mined.error = f"{type(e).__name__}: {e}"
        return mined
    starts = [0] + [m.end() for m in _NEWLINE.finditer(source)]

    def line_end(lineno: int) -> int:
        """Offset just past line `lineno` (1-based) and its newline."""
        return starts[lineno] if lineno < len(starts) else len(source)

    for fn, name in functions:
        mined.functions += 1
        doc = _docstring(fn)
        if doc is None:
            mined.reject(NO_DOCSTRING)
            continue
        rest = fn.body[1:]
        if not rest:
            mined.reject(DOCSTRING_ONLY)
            continue
        if all(_is_stub(s) for s in rest):
            mined.reject(STUB_BODY)
            continue
        doc_end = doc.end_lineno or doc.lineno
        if rest[0].lineno <= doc_end:
            mined.reject(INLINE_BODY)
            continue
        first = min([fn.lineno, *(d.lineno for d in fn.decorator_list)])
        cut = line_end(doc_end)
        completion = source[cut : line_end(fn.end_lineno or fn.lineno)]
        if not completion.endswith(("\n", "\r")):
            completion += "\n"
        mined.pairs.append(Pair(source[starts[first - 1] : cut], completion, name, first))
    return mined


def code_lines(text: str) -> int:
    """Lines of `text` that hold more than whitespace."""
    return sum(1 for line in _NEWLINE.split(text) if line.strip())


def limit_reason(
    prompt: str,
    completion: str,
    max_prompt_chars: int,
    max_completion_chars: int,
    min_completion_lines: int,
) -> str | None:
    """Why a pair is outside the configured limits, or None when it is within them."""
    if len(prompt) > max_prompt_chars:
        return PROMPT_TOO_LONG
    if len(completion) > max_completion_chars:
        return COMPLETION_TOO_LONG
    if code_lines(completion) < min_completion_lines:
        return COMPLETION_TOO_SHORT
    return None


@dataclass(frozen=True)
class Record:
    """A prompt/completion record of a JSONL file; `meta` is the JSON of its other keys."""

    prompt: str
    completion: str
    meta: str | None


def parse_record(line: bytes) -> tuple[Record | None, str, str]:
    """A JSONL line as (record, "", "") or (None, reason, detail): a bad line is never skipped
    without a reason."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, JSONL_NOT_UTF8, f"not UTF-8 ({e.reason} at byte {e.start})"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, JSONL_NOT_JSON, f"not JSON ({e.msg}, column {e.colno})"
    if not isinstance(obj, dict):
        return None, JSONL_NOT_OBJECT, f"a JSON {type(obj).__name__}, not an object"
    values: dict[str, str] = {}
    for key in ("prompt", "completion"):
        if key not in obj:
            keys = ", ".join(sorted(obj)) or "none"
            return None, JSONL_MISSING_KEY, f"no '{key}' (keys: {keys})"
        value = obj[key]
        if not isinstance(value, str):
            return None, JSONL_NOT_TEXT, f"'{key}' is a JSON {type(value).__name__}, not a string"
        if not value.strip():
            return None, JSONL_EMPTY, f"'{key}' is empty"
        values[key] = value
    others = {k: v for k, v in obj.items() if k not in values}
    meta = json.dumps(others, sort_keys=True, ensure_ascii=False) if others else None
    return Record(values["prompt"], values["completion"], meta), "", ""


def split_sizes(directory: Path, key: str) -> dict[str, int]:
    """Pairs per split of a pairs artifact, from its manifest and the Parquet footers;
    ArtifactError naming `key` (the config key that points at it) when it is not one. Only the
    footers are read: finetune's and evaluate's plans call this."""
    import pyarrow.parquet as pq

    from albor.artifact import read_manifest
    from albor.data.corpus import SPLITS

    manifest = read_manifest(directory)
    have = {o["path"] for o in manifest["outputs"]}
    fix = f"point `{key}:` at the output of the pairs stage"
    if "train.parquet" not in have:
        raise ArtifactError(
            f"{directory}: artifact of stage '{manifest['stage']}' holds no train.parquet ({fix})"
        )
    found: dict[str, int] = {}
    for split in SPLITS:
        path = directory / f"{split}.parquet"
        if path.name not in have:
            continue
        try:
            parquet = pq.ParquetFile(path)
        except OSError as e:  # pyarrow's errors on a missing or damaged file are OSErrors
            raise ArtifactError(f"{path}: unreadable pairs file: {e}") from e
        if not set(PAIR_COLUMNS) <= set(parquet.schema_arrow.names):
            # A split artifact has train.parquet too, of whole documents: training on it would
            # fail at the first batch, after the base has loaded.
            raise ArtifactError(
                f"{path}: no prompt and completion columns: artifact of stage "
                f"'{manifest['stage']}' is not a pairs artifact ({fix})"
            )
        found[split] = parquet.metadata.num_rows
    return found
