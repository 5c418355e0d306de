"""Artifact naming and file hashing: the `.NAME.partial` rule both ways, file and tree digests,
the digest of a model directory made elsewhere."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from albor.artifact import (
    artifact_digest,
    find_artifacts,
    model_dir_digest,
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


def _model_dir(root: Path) -> Path:
    d = root / "teacher"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "model.safetensors").write_bytes(b"weights" * 100)
    (d / "tokenizer.json").write_text("{}")
    return d


def test_a_model_dir_without_manifest_has_a_digest_of_its_model_files(tmp_path: Path) -> None:
    d = _model_dir(tmp_path)
    first = artifact_digest(d)
    assert first == model_dir_digest(d)
    (d / "README.md").write_text("a model card")  # not a model file
    (d / ".git").mkdir()
    assert artifact_digest(d) == first
    (d / "model.safetensors").write_bytes(b"weights" * 99 + b"changed")
    os.utime(d / "model.safetensors", ns=(1, 1))  # a fresh mtime key: no stale cached hash
    second = artifact_digest(d)
    assert second != first
    (d / "tokenizer.json").write_text('{"added_tokens": []}')
    assert artifact_digest(d) not in (first, second)
    (d / "model-00002.safetensors").write_bytes(b"more")
    assert artifact_digest(d) != second


def test_a_dir_that_is_neither_artifact_nor_model_is_refused(tmp_path: Path) -> None:
    from albor.errors import ArtifactError

    (tmp_path / "x").mkdir()
    with pytest.raises(ArtifactError, match=r"no manifest\.json"):
        artifact_digest(tmp_path / "x")
    with pytest.raises(ArtifactError, match="neither an albor artifact"):
        model_dir_digest(tmp_path / "x")
