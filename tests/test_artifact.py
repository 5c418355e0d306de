"""Artifact naming and file hashing: the `.NAME.partial` rule both ways, file and tree digests."""

from __future__ import annotations

import hashlib
from pathlib import Path

from albor.artifact import (
    find_artifacts,
    output_dir_for,
    partial_dir,
    sha256_file,
    sha256_tree,
)


def test_partial_dir_and_back(tmp_path: Path) -> None:
    out = tmp_path / "pretrain"
    work = partial_dir(out)
    assert work == tmp_path / ".pretrain.partial"
    assert output_dir_for(work) == out
    assert output_dir_for(out) == out  # a finished output is its own output
    assert output_dir_for(tmp_path / ".partial") == tmp_path / ".partial"  # no NAME: not a work dir
    assert output_dir_for(Path("rel") / ".x.partial") == (Path("rel") / "x").absolute()


def test_a_work_dir_is_never_taken_for_an_artifact(tmp_path: Path) -> None:
    for d in (tmp_path / "a", partial_dir(tmp_path / "b")):
        d.mkdir()
        (d / "manifest.json").write_text("{}")
    assert find_artifacts(tmp_path) == [tmp_path / "a"]


def test_sha256_file_reads_in_chunks(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    data = bytes(range(256)) * 9000  # over two 1 MiB chunks
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_sha256_tree_names_and_contents(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.txt").write_text("beta")
    # The digest stage fingerprints were made with: each (relative path, sha256), sorted.
    h = hashlib.sha256()
    for rel, text in (("a.txt", b"alpha"), ("sub/b.txt", b"beta")):
        h.update(rel.encode())
        h.update(hashlib.sha256(text).digest())
    assert sha256_tree(root) == h.hexdigest()
    single = hashlib.sha256(b"a.txt" + hashlib.sha256(b"alpha").digest()).hexdigest()
    assert sha256_tree(root / "a.txt") == single  # a lone file: its name and contents
    before = sha256_tree(root)
    (root / "sub" / "b.txt").rename(root / "sub" / "c.txt")
    renamed = sha256_tree(root)
    (root / "sub" / "c.txt").write_text("gamma")
    assert len({before, renamed, sha256_tree(root)}) == 3
