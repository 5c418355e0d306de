"""Docstring -> body mining: exactly the documented functions with a real body give pairs, each an
exact slice of the source that still parses once dedented; bad files and JSONL lines get reasons."""

from __future__ import annotations

import ast
import json
import textwrap
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from albor.data import pairs
from albor.data.corpus import draw_split
from albor.stages import split

SOURCE = '''\
"""Module docstring: not a function's."""

import functools


def no_doc(x):
    return x + 1


def one_line(a, b):
    """Add two numbers."""
    total = a + b
    return total


@functools.lru_cache(maxsize=None)
@staticmethod
def decorated(n):
    """Fibonacci, cached.

    Slow without the cache.
    """
    if n < 2:
        return n
    return decorated(n - 1) + decorated(n - 2)  # tail comment


async def fetch(url):
    """Fetch a URL."""
    await sleep(0)
    return url


class Shape:
    """A shape."""

    def area(self):
        """The area of the shape."""
        raise NotImplementedError("subclass")

    def scaled(self, k):
        """A copy scaled by k.

        Keeps the original.
        """
        new = Shape()
        new.k = k
        return new


def outer(xs):
    """Sum the squares of xs."""

    def square(x):
        """Square x."""
        return x * x

    return sum(square(x) for x in xs)


def only_doc():
    """Nothing follows."""


def stub():
    """To do."""
    ...
'''


def function_text(source: str, name: str) -> str:
    """The lines of function `name` (first decorator through last line), found independently of
    `pairs.mine`."""
    lines = source.splitlines(keepends=True)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            return "".join(lines[first - 1 : node.end_lineno])
    raise AssertionError(name)


def test_mines_exactly_the_documented_functions_with_a_body() -> None:
    mined = pairs.mine(SOURCE)
    assert mined.error is None
    assert mined.functions == 10
    assert mined.rejected == {"no_docstring": 1, "stub_body": 2, "docstring_only": 1}
    by_name = {p.name: p for p in mined.pairs}
    assert list(by_name) == [
        "one_line",
        "decorated",
        "fetch",
        "Shape.scaled",
        "outer",
        "outer.<locals>.square",
    ]
    for p in mined.pairs:
        short = p.name.rsplit(".", 1)[-1]
        assert p.prompt + p.completion == function_text(SOURCE, short)
        assert p.prompt.endswith("\n") and p.completion.endswith("\n") and p.completion.strip()
        assert p.sha256 == pairs.pair_sha256(p.prompt, p.completion)

    one = by_name["one_line"]
    assert one.prompt == 'def one_line(a, b):\n    """Add two numbers."""\n'
    assert one.completion == "    total = a + b\n    return total\n"
    assert one.lineno == 10
    deco = by_name["decorated"]
    assert deco.prompt.startswith("@functools.lru_cache(maxsize=None)\n@staticmethod\ndef ")
    assert deco.prompt.endswith('    Slow without the cache.\n    """\n')
    assert deco.completion.endswith("  # tail comment\n") and deco.lineno == 16
    assert by_name["fetch"].prompt.startswith("async def fetch(url):\n")
    method = by_name["Shape.scaled"]
    assert method.prompt.startswith('    def scaled(self, k):\n        """A copy')
    assert method.completion == "        new = Shape()\n        new.k = k\n        return new\n"
    # The outer function's completion holds the inner one whole, blank lines included.
    inner = by_name["outer.<locals>.square"]
    assert by_name["outer"].completion.startswith("\n" + inner.prompt + inner.completion)


def test_line_endings_and_a_missing_final_newline() -> None:
    crlf = 'def f(x):\r\n    """Doc."""\r\n    return x\r\n'
    [p] = pairs.mine(crlf).pairs
    assert p.prompt + p.completion == crlf
    assert p.completion == "    return x\r\n"
    # \f is not a newline to Python; a line split there would shift every line after it.
    formfeed = '\x0c\ndef g():\n    """Doc."""\n    y = "\x0c"\n    return y\n'
    [q] = pairs.mine(formfeed).pairs
    assert q.prompt == 'def g():\n    """Doc."""\n' and q.lineno == 2
    [r] = pairs.mine('def h():\n    "Doc."\n    return 1').pairs
    assert r.completion == "    return 1\n"


def test_body_on_the_docstring_line_and_stub_variants() -> None:
    mined = pairs.mine('def f(): "Doc."; return 1\n')
    assert mined.pairs == [] and mined.rejected == {"inline_body": 1}
    stubs = [
        "pass",
        "...",
        "raise NotImplementedError",
        "raise NotImplementedError('later')",
        "pass\n    ...",
    ]
    for body in stubs:
        mined = pairs.mine(f'def f():\n    """Doc."""\n    {body}\n')
        assert mined.rejected == {"stub_body": 1}, body
    real = pairs.mine('def f(x):\n    """Doc."""\n    if x:\n        raise NotImplementedError\n')
    assert len(real.pairs) == 1
    # An f-string is not a docstring; bytes neither.
    assert pairs.mine('def f():\n    f"{1}"\n    return 1\n').rejected == {"no_docstring": 1}
    assert pairs.mine('def f():\n    b"x"\n    return 1\n').rejected == {"no_docstring": 1}


def test_lambdas_and_class_docstrings_give_no_pair() -> None:
    # A lambda has no docstring to cut at and a class's docstring documents no body: neither is
    # a function here, so neither is counted; the method inside the class still is.
    source = (
        'square = lambda x: x * x\n\n\nclass C:\n    """A class."""\n\n'
        '    def m(self):\n        """Method."""\n        return (lambda: 1)()\n'
    )
    mined = pairs.mine(source)
    assert mined.functions == 1 and mined.rejected == {}
    [pair] = mined.pairs
    assert pair.name == "C.m" and pair.completion == "        return (lambda: 1)()\n"


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("def f(:\n    pass\n", "SyntaxError"),
        ("x = 1\x00\n", "Error"),  # SyntaxError on 3.12+, ValueError before
        ("x = a" + ".b" * 100_000 + "\n", "RecursionError"),
        ("x = " + "-" * 100_000 + "1\n", "Error"),  # the parser's stack: MemoryError on 3.11
        ("print 'python 2'\n", "SyntaxError"),
    ],
)
def test_unparsable_source_is_reported_not_raised(source: str, error: str) -> None:
    mined = pairs.mine(source)
    assert mined.error is not None and error in mined.error
    assert mined.pairs == [] and mined.functions == 0 and mined.rejected == {}


def test_odd_escapes_raise_no_warning() -> None:
    # The corpus is full of "\d"; under `-W error` the parser's warning would fail the file.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mined = pairs.mine('def f():\n    """Match \\d."""\n    return "\\d"\n')
    assert len(mined.pairs) == 1


def test_limits() -> None:
    assert pairs.limit_reason("p" * 11, "x\n", 10, 10, 1) == pairs.PROMPT_TOO_LONG
    assert pairs.limit_reason("p", "x\n" * 6, 10, 10, 1) == pairs.COMPLETION_TOO_LONG
    assert pairs.limit_reason("p", "x = 1\n\n   \n", 10, 20, 2) == pairs.COMPLETION_TOO_SHORT
    assert pairs.limit_reason("p", "x = 1\ny = 2\n", 10, 20, 2) is None
    assert pairs.code_lines("a\r\n\r\nb\rc\n") == 3


def test_parse_record_reasons() -> None:
    rec, reason, _ = pairs.parse_record(b'{"prompt": "p", "completion": "c", "id": 3}')
    assert rec == pairs.Record("p", "c", '{"id": 3}') and reason == ""
    rec, _, _ = pairs.parse_record(json.dumps({"prompt": "p", "completion": "c"}).encode())
    assert rec is not None and rec.meta is None
    bad = {
        b'{"prompt": "p", "completion": ': pairs.JSONL_NOT_JSON,
        b'["p", "c"]': pairs.JSONL_NOT_OBJECT,
        b'{"prompt": "p"}': pairs.JSONL_MISSING_KEY,
        b'{"prompt": "p", "completion": 3}': pairs.JSONL_NOT_TEXT,
        b'{"prompt": " ", "completion": "c"}': pairs.JSONL_EMPTY,
        b'{"prompt": "\xff", "completion": "c"}': pairs.JSONL_NOT_UTF8,
    }
    for line, want in bad.items():
        rec, reason, detail = pairs.parse_record(line)
        assert rec is None and reason == want and detail, line


def test_draw_split_is_the_split_stage_rule() -> None:
    keys = [pairs.pair_sha256(str(i), "") for i in range(2000)]
    cfg = split.Config(val=0.2, test=0.1, seed="s")
    drawn = [draw_split(k, "s", 0.2, 0.1) for k in keys]
    assert drawn == [split.assign(k, cfg) for k in keys]
    assert 300 < drawn.count("val") < 500 and 120 < drawn.count("test") < 280


# ----- property: random modules from a small grammar ------------------------------------------

DOCSTRINGS = [
    '"""One line."""',
    '"""First line.\n\nMore text, indented like the code.\n"""',
    "'single quoted'",
    'r"""Raw \\d text."""',
    '"""Ends on the same line as text."""  # and a comment',
]
SIMPLE = [
    "x = 1",
    "return x",
    "pass",
    "...",
    "raise NotImplementedError",
    "y = [i * i for i in range(3)]",
    "# a comment",
    "z = (1,\n     2)",
    "s = '''multi\n    line'''",  # a continuation at column 0 would defeat dedent
    "if x:\n    x += 1\nelse:\n    x -= 1",
]


def _indent(lines: list[str]) -> list[str]:
    return ["    " + line if line else line for line in lines]


@st.composite
def statement(draw: st.DrawFn, depth: int) -> list[str]:
    kinds = ["simple", "simple"] + (["def", "class", "if"] if depth > 0 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "def":
        return draw(function(depth - 1))
    if kind == "class":
        methods = draw(st.lists(function(depth - 1), min_size=1, max_size=2))
        body = [line for m in methods for line in ["", *m]]
        return ["class C:", *_indent(body)]
    if kind == "if":
        return ["if True:", *_indent(draw(function(depth - 1)))]
    return draw(st.sampled_from(SIMPLE)).split("\n")


@st.composite
def function(draw: st.DrawFn, depth: int) -> list[str]:
    decorators = draw(st.lists(st.sampled_from(["@staticmethod", "@dec(1,\n     2)"]), max_size=2))
    head = "async def" if draw(st.booleans()) else "def"
    name = draw(st.sampled_from(["f", "load", "step"]))
    doc = draw(st.one_of(st.none(), st.sampled_from(DOCSTRINGS)))
    body: list[str] = doc.split("\n") if doc else []
    if draw(st.booleans()):
        body.append("")
    for stmt in draw(st.lists(statement(depth), min_size=0 if doc else 1, max_size=3)):
        body.extend(stmt)
    if not body or all(not line or line.startswith("#") for line in body):
        body.append("pass")
    lines = [line for d in decorators for line in d.split("\n")]
    return [*lines, f"{head} {name}(x):", *_indent(body)]


@st.composite
def module(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.one_of(function(2), statement(2)), min_size=1, max_size=4))
    text = "\n\n".join("\n".join(p) for p in parts)
    return text + draw(st.sampled_from(["\n", "", "\n\n# trailing\n"]))


@settings(max_examples=150, deadline=None)
@given(module())
def test_pairs_are_slices_that_parse(source: str) -> None:
    ast.parse(source)  # the grammar makes valid modules
    mined = pairs.mine(source)
    assert mined.error is None
    defs = sum(
        isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) for n in ast.walk(ast.parse(source))
    )
    assert mined.functions == defs == len(mined.pairs) + sum(mined.rejected.values())
    for p in mined.pairs:
        text = p.prompt + p.completion
        assert text in source or (text[:-1] in source and not source.endswith("\n"))
        assert p.completion.strip() and p.completion.endswith("\n")
        tree = ast.parse(textwrap.dedent(text))
        [fn] = tree.body
        assert isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
        assert ast.get_docstring(fn, clean=False) is not None
