"""Sources: glob matching, walking without following directory links, decoding, tables, state."""

from __future__ import annotations

import gzip
import json
import os
from fnmatch import fnmatchcase
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from albor.data import sources
from albor.data.sources import (
    DirSource,
    GlobSource,
    JsonlSource,
    ParquetSource,
    StdlibSource,
    glob_regex,
    iter_source,
    read_file,
    split_glob,
    walk,
)
from albor.errors import DataError


def matches(pattern: str, path: str) -> bool:
    return glob_regex(pattern).fullmatch(path) is not None


@given(
    st.text(alphabet="ab.*?[]!", max_size=8),
    st.text(alphabet="ab.[]!", max_size=6),
)
def test_glob_agrees_with_fnmatch_within_one_segment(pattern: str, name: str) -> None:
    assert matches(pattern, name) == fnmatchcase(name, pattern)


def test_glob_segments_and_depth() -> None:
    assert matches("**/*.py", "a.py") and matches("**/*.py", "a/b/c.py")
    assert not matches("*.py", "a/b.py") and not matches("**/*.py", "a.pyc")
    assert matches("test/**", "test/") and matches("test/**", "test/x/y.py")
    assert not matches("test/**", "tests/x.py")
    assert matches("[!j]*/**", "email/") and not matches("[!j]*/**", "json/")


def test_split_glob() -> None:
    assert split_glob("src/**/*.py") == (Path("src"), "**/*.py")
    assert split_glob("/a/b/c?.py") == (Path("/a/b"), "c?.py")
    assert split_glob("*.py") == (Path("."), "*.py")
    assert split_glob("lib/one.py") == (Path("lib"), "one.py")


def test_walk_is_sorted_prunes_excludes_and_never_follows_dir_links(tmp_path: Path) -> None:
    for rel in ["b.py", "a/z.py", "a/y.py", "skip/s.py", "a/deep/d.py", "c.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    os.symlink(tmp_path, tmp_path / "a" / "loop")  # a cycle, were it followed
    os.symlink(tmp_path / "a", tmp_path / "link.py")  # a directory link whose name matches
    rels = [e.rel for e in walk(tmp_path, ["**/*.py"], ["skip/**"])]
    assert rels == ["b.py", "link.py", "a/y.py", "a/z.py", "a/deep/d.py"]
    assert [e.rel for e in walk(tmp_path, ["*/*.py"])] == ["a/y.py", "a/z.py", "skip/s.py"]
    assert read_file(str(tmp_path / "link.py"), 100) == (None, sources.NOT_A_FILE)


def test_read_file_and_decode(tmp_path: Path) -> None:
    f = tmp_path / "bom.py"
    f.write_bytes(b"\xef\xbb\xbfx = 1\n")
    assert read_file(str(f), 100) == ("x = 1\n", None)
    assert read_file(str(f), 5) == (None, sources.TOO_LARGE)
    assert read_file(str(tmp_path / "gone.py"), 100) == (None, sources.UNREADABLE)
    assert sources.decode(b"\xff") == (None, sources.INVALID_UTF8)
    assert sources.decode(b"a\x00") == (None, sources.BINARY)
    assert sources.decode(b" \n") == (None, sources.EMPTY)
    assert sources.check_text("p", "\ud800", 100).reason == sources.INVALID_UTF8
    assert sources.check_text("p", "é" * 60, 100).reason == sources.TOO_LARGE  # bytes, not chars


def test_unlistable_subdirectory_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ok.py").write_text("x = 1\n")
    (tmp_path / "sealed").mkdir()
    real = os.scandir

    def scandir(path: str) -> object:
        if str(path).endswith("sealed"):
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    reads = list(iter_source(DirSource(path=tmp_path), 100))
    assert [(r.path, r.reason) for r in reads] == [("ok.py", None), ("sealed/", "unreadable")]


def test_stdlib_scan_skips_site_packages() -> None:
    entries = list(sources.file_entries(StdlibSource()))
    assert len(entries) > 1000
    assert not any("site-packages" in e.rel or "dist-packages" in e.rel for e in entries)
    assert "json/decoder.py" in {e.rel for e in entries}
    s = sources.scan(StdlibSource(), 1024**2)
    assert s.items == len(entries) and s.bytes > 10e6


def test_jsonl_rows(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl.gz"
    rows = [{"text": "a = 1\n"}, {"text": "\x00"}, [1], {"text": "b = 2\n", "p": "x.py"}]
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    with gzip.open(path, "ab") as g:
        g.write(b'{"text": "\xff"}\n')
    reads = list(iter_source(JsonlSource(path=path, path_column="p"), 100))
    assert [(r.path, r.reason) for r in reads] == [
        ("d.jsonl.gz:1", None),
        ("d.jsonl.gz:2", "binary"),
        ("d.jsonl.gz:3", "missing_column"),
        ("x.py", None),
        ("d.jsonl.gz:5", "invalid_utf8"),
    ]


def test_parquet_binary_column(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": [b"a = 1\n", b"\xff", None]}), tmp_path / "b.parquet")
    reads = list(iter_source(ParquetSource(path=tmp_path / "b.parquet"), 100, batch_rows=2))
    assert [r.reason for r in reads] == [None, "invalid_utf8", "null_text"]
    assert reads[0].text == "a = 1\n"


def test_state_tracks_paths_sizes_and_mtimes(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("x = 1\n")
    src = GlobSource(pattern=f"{tmp_path}/*.py")
    before = sources.state(src)
    assert sources.state(src) == before
    (tmp_path / "b.txt").write_text("ignored")
    assert sources.state(src) == before
    (tmp_path / "a.py").write_text("x = 22\n")
    assert sources.state(src) != before
    missing = sources.state(DirSource(path=tmp_path / "nope"))  # never raises
    assert missing != sources.state(DirSource(path=tmp_path / "nope2"))


def test_missing_root_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="directory not found"):
        list(iter_source(DirSource(path=tmp_path / "nope"), 100))
    (tmp_path / "f.py").write_text("x = 1\n")
    with pytest.raises(DataError, match="not a directory"):
        sources.scan(DirSource(path=tmp_path / "f.py"), 100)
