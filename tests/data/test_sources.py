"""Sources: glob matching, walking without following directory links, decoding, tables, state."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from fnmatch import fnmatchcase
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from albor.data import sources
from albor.data.sources import (
    DirSource,
    GitSource,
    GlobSource,
    HfSource,
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


LATIN1_BODY = "name = 'café'\nprint(name)\n".encode("latin-1")


@pytest.mark.parametrize(
    "header",
    [
        b"# -*- coding: latin-1 -*-\n",
        b"#!/usr/bin/env python\n# coding=iso-8859-1\n",  # second line, after a shebang
        b"# vim: set fileencoding=cp1252 :\n",
    ],
)
def test_decode_honours_a_coding_cookie(header: bytes) -> None:
    text, reason = sources.decode(header + LATIN1_BODY)
    assert reason is None and text is not None
    assert "name = 'café'" in text and text.startswith(header.decode("ascii"))


def test_decode_rejects_bad_declarations() -> None:
    assert sources.decode(LATIN1_BODY) == (None, sources.INVALID_UTF8)  # no cookie
    # A cookie on the third line does not count (PEP 263), so the bytes must be UTF-8.
    late = b"x = 1\ny = 2\n# coding: latin-1\n" + LATIN1_BODY
    assert sources.decode(late) == (None, sources.INVALID_UTF8)
    assert sources.decode(b"# coding: klingon\nx = 1\n") == (None, sources.BAD_ENCODING)
    assert sources.decode(b"# coding: rot13\nx = 1\n") == (None, sources.BAD_ENCODING)  # not text
    assert sources.decode(b"\xef\xbb\xbf# coding: latin-1\nx = 1\n") == (None, "bad_encoding")
    # Bytes the declared codec cannot decode: the declaration is wrong.
    assert sources.decode(b"# coding: ascii\nx = '\xe9'\n") == (None, sources.BAD_ENCODING)
    assert sources.decode(b"\xef\xbb\xbf# coding: utf-8\nx = 1\n") == (
        "# coding: utf-8\nx = 1\n",
        None,
    )
    assert sources.decode(b"x = 1\n\x00y = 2\n") == (None, sources.BINARY)  # a NUL mid-file


def test_parquet_binary_column_honours_cookies(tmp_path: Path) -> None:
    cells = [b"# coding: latin-1\n" + LATIN1_BODY, b"# coding: nope\nx = 1\n"]
    pq.write_table(pa.table({"text": cells}), tmp_path / "b.parquet")
    reads = list(iter_source(ParquetSource(path=tmp_path / "b.parquet"), 100))
    assert [r.reason for r in reads] == [None, "bad_encoding"]
    assert reads[0].text is not None and "café" in reads[0].text


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        check=True,
        capture_output=True,
    )


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git checkout: two tracked .py files, a tracked text file, an untracked .py file."""
    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    (root / "a.py").write_text("a = 1\n")
    (root / "pkg" / "b.py").write_text("b = 2\n")
    (root / "notes.txt").write_text("not python\n")
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "init")
    (root / "untracked.py").write_text("u = 3\n")
    return root


def test_git_source_reads_only_tracked_files(repo: Path) -> None:
    src = GitSource(path=repo)
    checkout = sources.git_checkout(src)
    assert checkout.files == ["a.py", "pkg/b.py"]
    assert checkout.commit is not None and len(checkout.commit) == 40
    assert [(r.path, r.text) for r in iter_source(src, 100)] == [
        ("a.py", "a = 1\n"),
        ("pkg/b.py", "b = 2\n"),
    ]
    assert sources.scan(src, 100).items == 2
    assert not sources.git_dirty(src)
    # A folder inside the checkout reads the tracked files under it, relative to it.
    assert sources.git_checkout(GitSource(path=repo / "pkg")).files == ["b.py"]
    assert sources.git_checkout(GitSource(path=repo, exclude=["pkg/**"])).files == ["a.py"]
    before = sources.state(src)
    (repo / "a.py").write_text("a = 10\n")
    assert sources.git_dirty(src) and sources.state(src) != before
    git(repo, "commit", "-q", "-am", "two")
    assert sources.git_checkout(src).commit != checkout.commit


def test_git_source_errors_say_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.py").write_text("a = 1\n")
    with pytest.raises(DataError, match=r"not a git working tree .*use `type: dir`"):
        sources.scan(GitSource(path=tmp_path / "plain"), 100)
    with pytest.raises(DataError, match="directory not found"):
        sources.git_checkout(GitSource(path=tmp_path / "nope"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(DataError, match="git: command not found: install git") as e:
        sources.git_checkout(GitSource(path=tmp_path / "plain"))
    assert isinstance(e.value.__cause__, FileNotFoundError)


def test_hf_without_datasets_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    src = HfSource(dataset="org/name")
    with pytest.raises(DataError, match=re.escape("pip install 'albor[hf]'")) as e:
        list(iter_source(src, 100))
    assert isinstance(e.value.__cause__, ImportError)
    assert "org/name" in str(e.value)


def test_hf_dataset_not_in_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    was_offline = bool(datasets.config.HF_HUB_OFFLINE)
    with pytest.raises(DataError) as e:
        sources.scan(HfSource(dataset="org/name"), 100)
    assert str(e.value) == (
        f"dataset org/name is not in the local HF cache ({tmp_path / 'hf' / 'datasets'}): "
        "download it on a machine with network, or use a parquet source"
    )
    assert isinstance(e.value.__cause__, ConnectionError | FileNotFoundError)
    assert datasets.config.HF_HUB_OFFLINE is was_offline  # the switch is put back
    assert not (tmp_path / "hf").exists()  # nothing written, nothing downloaded


def test_hf_dataset_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants as hub

    calls: list[dict[str, object]] = []
    was_offline = bool(hub.HF_HUB_OFFLINE)

    def load_dataset(path: str, name: str | None, **kwargs: object) -> object:
        # What a cached dataset returns; the Hub must be off while it loads.
        calls.append({"path": path, "name": name, "offline": hub.HF_HUB_OFFLINE, **kwargs})
        assert datasets.config.HF_HUB_OFFLINE is True
        return datasets.Dataset.from_dict(
            {
                "content": ["a = 1\n", None, "\x00", "b = 2\n"],
                "repo_path": ["r/a.py", "r/n.py", None, "r/b.py"],
                "stars": [1, 2, 3, 4],
            }
        )

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    src = HfSource(dataset="org/code", config="python", path_column="repo_path")
    reads = list(iter_source(src, 100, batch_rows=3))
    assert [(r.path, r.reason) for r in reads] == [
        ("r/a.py", None),
        ("r/n.py", "null_text"),
        ("org/code:train:2", "binary"),
        ("r/b.py", None),
    ]
    assert calls[0] == {
        "path": "org/code",
        "name": "python",
        "offline": True,
        "split": "train",
        "download_mode": "reuse_cache_if_exists",
    }
    assert hub.HF_HUB_OFFLINE is was_offline
    assert sources.scan(src, 100).items == 4
    for bad, message in [
        (HfSource(dataset="org/code", column="text"), "no column 'text' (columns: content"),
        (HfSource(dataset="org/code", column="stars"), "column 'stars' holds"),
    ]:
        with pytest.raises(DataError, match=re.escape(message)):
            sources.scan(bad, 100)


def test_hf_dataset_id_is_checked() -> None:
    with pytest.raises(ValidationError):
        HfSource(dataset="not a dataset id")
