"""ingest: every file seen lands in exactly one place (kept, or rejected with the right reason)."""

from __future__ import annotations

import faulthandler
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from albor.artifact import read_manifest
from albor.config import validate
from albor.data.corpus import SCHEMA
from albor.errors import ConfigError, DataError, PlanFailed
from albor.stage import ApplyContext, RunResult, load_stage, partial_dir, run_stage, state_of
from albor.stages import ingest

GOOD = "def f(x):\n    return x + 1\n"
FILES = {"corpus.parquet", "manifest.json", "rejected.parquet"}


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    """A FIFO opened for reading blocks forever; if ingest ever did that, fail loudly, not hang."""
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def config(output: Path, *sources: dict[str, Any], **knobs: Any) -> ingest.Config:
    data = {"sources": list(sources), "output": str(output), **knobs}
    return validate(ingest.Config, data, "test.yaml")


def run(cfg: ingest.Config) -> RunResult:
    return run_stage(load_stage("ingest"), cfg)


def rejected_by_path(out: Path) -> dict[str, str]:
    table = pq.read_table(out / "rejected.parquet")
    return dict(zip(table["path"].to_pylist(), table["reason"].to_pylist(), strict=True))


def test_messy_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "good.py").write_text(GOOD)
    (src / "pkg" / "good2.py").write_text("import os\n\nprint(os.sep)\n")
    (src / "binary.py").write_bytes(b"x = 1\x00\x01\n")
    (src / "latin1.py").write_bytes(b"name = 'caf\xe9'\n")
    (src / "empty.py").write_bytes(b"")
    (src / "blank.py").write_text("   \n\n\t\n")
    with open(src / "huge.py", "wb") as f:
        f.truncate(20 * 1024 * 1024)  # sparse: rejected by its size, never read
    os.symlink("loop_b.py", src / "loop_a.py")
    os.symlink("loop_a.py", src / "loop_b.py")
    os.symlink("nowhere.py", src / "dangling.py")
    os.symlink("good.py", src / "linked.py")  # a symlink to a real file is read like the file
    os.symlink("..", src / "pkg" / "up")  # a directory loop: never followed
    os.mkfifo(src / "fifo.py")
    (src / "locked.py").write_text(GOOD)
    (src / "notes.txt").write_text("not python, not seen")

    # Permission bits do not stop root, so refusing the open simulates an unreadable file.
    real_open = os.open

    def refusing_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith("locked.py"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)

    out = tmp_path / "out"
    result = run(config(out, {"type": "dir", "path": str(src)}))
    assert result.status == "ran"
    assert {p.name for p in out.iterdir()} == FILES
    assert rejected_by_path(out) == {
        "binary.py": "binary",
        "blank.py": "empty",
        "dangling.py": "broken_link",
        "empty.py": "empty",
        "fifo.py": "not_a_file",
        "huge.py": "too_large",
        "latin1.py": "invalid_utf8",
        "locked.py": "unreadable",
        "loop_a.py": "broken_link",
        "loop_b.py": "broken_link",
    }
    corpus = pq.read_table(out / "corpus.parquet")
    assert corpus.schema == SCHEMA
    assert sorted(corpus["path"].to_pylist()) == ["good.py", "linked.py", "pkg/good2.py"]
    assert set(corpus["source"].to_pylist()) == {"dir"}
    assert corpus["text"].to_pylist()[0] == GOOD
    c = result.manifest["counts"]
    assert c["in"] == 13 == c["kept"] + sum(c["rejected"].values())
    assert c["rejected"] == {
        "binary": 1,
        "broken_link": 3,
        "empty": 2,
        "invalid_utf8": 1,
        "not_a_file": 1,
        "too_large": 1,
        "unreadable": 1,
    }
    assert result.manifest["metrics"]["bytes_kept"] == sum(corpus["bytes"].to_pylist())
    assert result.manifest["summary"].startswith("13 files in, 3 kept")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permission bits")
def test_permission_denied_is_unreadable(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.py").write_text(GOOD)
    locked = src / "locked.py"
    locked.write_text(GOOD)
    locked.chmod(0)
    try:
        run(config(tmp_path / "out", {"type": "dir", "path": str(src)}))
    finally:
        locked.chmod(0o644)
    assert rejected_by_path(tmp_path / "out") == {"locked.py": "unreadable"}


def test_plan_fails_without_files_and_apply_writes_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "README.md").write_text("# no python here\n")
    for source, message in [
        ({"type": "dir", "path": str(src)}, "no file matches **/*.py"),
        ({"type": "dir", "path": str(tmp_path / "missing")}, "directory not found"),
        ({"type": "glob", "pattern": f"{src}/**/*.py"}, "no file matches"),
        ({"type": "jsonl", "path": str(tmp_path / "nope.jsonl")}, "file not found"),
    ]:
        out = tmp_path / "out"
        cfg = config(out, source)
        p = ingest.plan(cfg)
        assert not p.ok
        assert message in p.failures[0].detail
        with pytest.raises(PlanFailed, match=re.escape(message)):
            run(cfg)
        assert not out.exists() and not partial_dir(out).exists()


def test_stdlib_plan_is_stat_only_and_skips_site_packages(tmp_path: Path) -> None:
    p = ingest.plan(config(tmp_path / "out", {"type": "stdlib"}))
    assert p.ok, p.summary()
    stdlib = p.estimates["sources"]["stdlib"]
    assert stdlib["files"] > 1000 and stdlib["bytes"] > 10e6
    assert p.estimates["disk_bytes"] < p.estimates["input_mb"] * 1e6
    assert not (tmp_path / "out").exists()


def test_stdlib_apply_on_one_package(tmp_path: Path) -> None:
    # Everything but the json package is excluded, to keep the test fast.
    out = tmp_path / "out"
    result = run(config(out, {"type": "stdlib", "exclude": ["*.py", "[!j]*/**"]}))
    paths = pq.read_table(out / "corpus.parquet")["path"].to_pylist()
    assert "json/decoder.py" in paths and all(p.startswith("json/") for p in paths)
    assert result.manifest["counts"]["kept"] == len(paths)
    assert result.manifest["inputs"][0]["type"] == "stdlib"


def test_glob_source(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "one.py").write_text(GOOD)
    (src / "a" / "b" / "two.py").write_text(GOOD + "\n")
    (src / "top.py").write_text(GOOD + "\n\n")
    out = tmp_path / "out"
    run(config(out, {"type": "glob", "pattern": f"{src}/a/**/*.py", "name": "code"}))
    corpus = pq.read_table(out / "corpus.parquet")
    # Paths are relative to the pattern's fixed part (`src/a`), as a dir source's are to its root.
    assert sorted(corpus["path"].to_pylist()) == ["b/two.py", "one.py"]
    assert set(corpus["source"].to_pylist()) == {"code"}


def test_parquet_and_jsonl_sources(tmp_path: Path) -> None:
    table = pa.table(
        {"content": [GOOD, None, "", "y = 2\n"], "file": ["m/a.py", "m/b.py", "m/c.py", None]}
    )
    pq.write_table(table, tmp_path / "docs.parquet")
    lines = [
        json.dumps({"text": GOOD, "path": "j/a.py"}),
        "{not json",
        json.dumps({"code": GOOD}),
        json.dumps({"text": None}),
        json.dumps({"text": 3}),
        "",
        json.dumps({"text": "z = 3\n"}),
    ]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    cfg = config(
        out,
        {
            "type": "parquet",
            "path": str(tmp_path / "docs.parquet"),
            "column": "content",
            "path_column": "file",
        },
        {"type": "jsonl", "path": str(tmp_path / "docs.jsonl"), "path_column": "path"},
    )
    p = ingest.plan(cfg)
    assert p.ok and p.estimates["sources"]["parquet"]["rows"] == 4
    result = run(cfg)
    corpus = pq.read_table(out / "corpus.parquet")
    assert corpus["path"].to_pylist() == ["m/a.py", "docs.parquet:3", "j/a.py", "docs.jsonl:7"]
    assert corpus["source"].to_pylist() == ["parquet", "parquet", "jsonl", "jsonl"]
    assert rejected_by_path(out) == {
        "m/b.py": "null_text",
        "m/c.py": "empty",
        "docs.jsonl:2": "not_json",
        "docs.jsonl:3": "missing_column",
        "docs.jsonl:4": "null_text",
        "docs.jsonl:5": "not_text",
    }
    m = result.manifest
    assert m["counts"]["in"] == 10 and m["counts"]["kept"] == 4
    assert m["metrics"]["sources"]["jsonl"]["rejected"]["not_json"] == 1
    assert m["summary"].startswith("10 documents in, 4 kept")


def test_bad_parquet_is_a_clear_error(tmp_path: Path) -> None:
    pq.write_table(pa.table({"body": ["x = 1\n"]}), tmp_path / "no_text.parquet")
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet at all")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    for name, message in [
        ("no_text.parquet", "no column 'text' (columns: body)"),
        ("corrupt.parquet", "not a readable Parquet file"),
        ("ints.parquet", "column 'text' holds int64, not text"),
    ]:
        cfg = config(tmp_path / "out", {"type": "parquet", "path": str(tmp_path / name)})
        p = ingest.plan(cfg)
        assert not p.ok and message in p.failures[0].detail
        assert p.failures[0].detail.startswith(str(tmp_path / name))
        # apply on its own (without the plan in front) raises the same one-line DataError.
        ctx = ApplyContext(out=tmp_path / "direct", name="ingest", fingerprint="x")
        with pytest.raises(DataError, match=re.escape(message)):
            ingest.apply(cfg, ctx)


def test_rerun_is_up_to_date_until_a_source_changes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text(GOOD)
    (src / "b.py").write_text(GOOD + "\n")
    cfg = config(tmp_path / "out", {"type": "dir", "path": str(src)})
    assert run(cfg).status == "ran"
    first = read_manifest(tmp_path / "out")
    assert run(cfg).status == "up to date"
    st = (src / "a.py").stat()
    os.utime(src / "a.py", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touch
    assert state_of(load_stage("ingest"), cfg).reason == "input changed"
    assert run(cfg).status == "ran"
    assert read_manifest(tmp_path / "out")["fingerprint"] != first["fingerprint"]
    (src / "c.py").write_text("z = 1\n")  # a new file also counts as a change
    assert run(cfg).status == "ran"
    assert read_manifest(tmp_path / "out")["counts"]["kept"] == 3


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sources"):
        config(tmp_path)
    with pytest.raises(ConfigError, match=r"sources\[0\]\.dir\.pathh: unknown key"):
        config(tmp_path, {"type": "dir", "pathh": "x"})
    with pytest.raises(ConfigError, match="used twice"):
        config(tmp_path, {"type": "stdlib"}, {"type": "stdlib"})
    with pytest.raises(ConfigError, match="type"):
        config(tmp_path, {"type": "ftp", "path": "x"})
    assert config(tmp_path, {"type": "stdlib"}, max_file_bytes="2M").max_file_bytes == 2 * 1024**2
    assert ingest.Config().sources[0].type == "stdlib"  # the built-in default corpus


def test_encodings_and_binary(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    body = "name = 'café'\nprint(name)\n"
    (src / "cookie.py").write_bytes(b"# -*- coding: latin-1 -*-\n" + body.encode("latin-1"))
    (src / "no_cookie.py").write_bytes(body.encode("latin-1"))
    (src / "klingon.py").write_bytes(b"# coding: klingon\nx = 1\n")
    (src / "nul.py").write_bytes(b"def f():\n    return 1\n\x00\ndef g():\n    return 2\n")
    (src / "bom.py").write_bytes(b"\xef\xbb\xbf" + body.encode())
    out = tmp_path / "out"
    result = run(config(out, {"type": "dir", "path": str(src)}))
    assert rejected_by_path(out) == {
        "klingon.py": "bad_encoding",
        "no_cookie.py": "invalid_utf8",
        "nul.py": "binary",
    }
    corpus = pq.read_table(out / "corpus.parquet").to_pylist()
    texts = {row["path"]: row["text"] for row in corpus}
    # Decoded with the declared codec; stored as UTF-8, so sha256 / bytes are of the UTF-8 text.
    assert texts == {"bom.py": body, "cookie.py": "# -*- coding: latin-1 -*-\n" + body}
    cookie = next(r for r in corpus if r["path"] == "cookie.py")
    assert cookie["bytes"] == len(cookie["text"].encode("utf-8"))
    assert result.manifest["counts"]["rejected"] == {
        "bad_encoding": 1,
        "binary": 1,
        "invalid_utf8": 1,
    }


def test_five_megabyte_minified_line(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "blob.py").write_text("payload = [" + "0x7f, " * 850_000 + "]\n")
    (src / "ok.py").write_text(GOOD)
    out = tmp_path / "out"
    cfg = config(out, {"type": "dir", "path": str(src)})
    assert ingest.plan(cfg).checks[-1].status == "warn"  # over max_file_bytes, said up front
    run(cfg)
    assert rejected_by_path(out) == {"blob.py": "too_large"}
    run(config(out, {"type": "dir", "path": str(src)}, max_file_bytes="8M"))
    assert rejected_by_path(out) == {}  # clean's filters judge it then (tests/stages/test_clean)


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        check=True,
        capture_output=True,
    )


def test_git_source(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "main.py").write_text(GOOD)
    util = "import os\n\nprint(os.sep)\n"
    (repo / "pkg" / "util.py").write_text(util)
    (repo / "README.md").write_text("# docs\n")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "one")
    (repo / "scratch.py").write_text("untracked = True\n")
    head = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()

    out = tmp_path / "out"
    cfg = config(out, {"type": "git", "path": str(repo), "name": "proj"})
    p = ingest.plan(cfg)
    assert p.ok and p.estimates["sources"]["proj"] == {
        "type": "git",
        "files": 2,
        "bytes": len(GOOD) + len(util),
        "commit": head,
    }
    result = run(cfg)
    corpus = pq.read_table(out / "corpus.parquet")
    assert corpus["path"].to_pylist() == ["main.py", "pkg/util.py"]  # tracked .py only
    m = result.manifest
    assert m["metrics"]["sources"]["proj"]["commit"] == head
    assert m["metrics"]["sources"]["proj"]["dirty"] is False
    assert m["inputs"][0]["commit"] == head and m["inputs"][0]["type"] == "git"
    assert ingest.source_state(cfg)["proj"]["commit"] == head
    assert run(cfg).status == "up to date"
    (repo / "scratch.py").write_text("still untracked = 1\n")
    assert run(cfg).status == "up to date"  # untracked files are not the source
    git(repo, "add", "scratch.py")
    git(repo, "commit", "-q", "-m", "two")
    assert state_of(load_stage("ingest"), cfg).reason == "input changed"
    assert run(cfg).manifest["counts"]["kept"] == 3


def test_git_source_that_is_not_a_repo_fails_the_plan(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.py").write_text(GOOD)
    out = tmp_path / "out"
    cfg = config(out, {"type": "git", "path": str(tmp_path / "plain")})
    p = ingest.plan(cfg)
    assert not p.ok
    assert "not a git working tree" in p.failures[0].detail
    assert "use `type: dir`" in p.failures[0].detail
    with pytest.raises(PlanFailed, match="not a git working tree"):
        run(cfg)
    assert not out.exists() and not partial_dir(out).exists()


def test_hf_source_without_datasets_fails_the_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if `datasets` were not installed
    cfg = config(tmp_path / "out", {"type": "hf", "dataset": "bigcode/the-stack-smol"})
    p = ingest.plan(cfg)
    assert not p.ok
    assert "pip install 'albor[hf]'" in p.failures[0].detail
    assert ingest.source_state(cfg)["hf"]  # the fingerprint never raises


def test_workers_read_the_same_corpus(tmp_path: Path) -> None:
    """Files read in 2 worker processes, 3 per batch, give the bytes 1 process writes."""
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    for i in range(10):
        (src / "pkg" / f"m{i}.py").write_text(f"x{i} = {i}\n" * (i + 1))
    (src / "binary.py").write_bytes(b"x = 1\x00\x01\n")
    (src / "cookie.py").write_bytes(b"# -*- coding: latin-1 -*-\nname = 'caf\xe9'\n")
    (src / "empty.py").write_bytes(b"")
    os.mkfifo(src / "fifo.py")
    os.symlink("nowhere.py", src / "dangling.py")
    digests = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        result = run(config(out, {"type": "dir", "path": str(src)}, workers=workers, batch_rows=3))
        assert result.plan.estimates["workers"] == workers
        c = result.manifest["counts"]
        assert c["in"] == 15 and c["kept"] == 11
        assert c["rejected"] == {"binary": 1, "empty": 1, "not_a_file": 1, "broken_link": 1}
        digests[workers] = {o["path"]: o["sha256"] for o in result.manifest["outputs"]}
    assert digests[1] == digests[2]
    text = pq.read_table(tmp_path / "w2" / "corpus.parquet").to_pydict()
    assert text["text"][text["path"].index("cookie.py")].endswith("name = 'café'\n")
