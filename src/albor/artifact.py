"""Artifact directories: naming, hashing, atomic writes, and the `manifest.json` every stage output
carries.

A stage builds its output `NAME` in the work dir `.NAME.partial` beside it (hidden, so listings
and `find_artifacts` pass it by) and swaps it in when done; `partial_dir` and `output_dir_for`
are the one spelling of that rule.

A manifest records the stage, the resolved config, the inputs (path + digest), the outputs
(path + sha256 + size), counts (in / kept / rejected by reason), metrics, versions and wall time.
An artifact's *digest* is the sha256 of its outputs list: downstream fingerprints use it, so a
changed upstream output re-runs everything below it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from albor.errors import ArtifactError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
PARTIAL_SUFFIX = ".partial"
_CHUNK = 1 << 20


def partial_dir(output: Path) -> Path:
    """The work dir a stage writes `output` in before swapping it in: `.NAME.partial` beside it."""
    return output.parent / f".{output.name}{PARTIAL_SUFFIX}"


def output_dir_for(run_dir: Path) -> Path:
    """Where a dir ends up (absolute): a `.NAME.partial` work dir becomes `NAME`; any other dir is
    its own output."""
    run_dir = Path(run_dir).absolute()
    name = run_dir.name
    if name.startswith(".") and name.endswith(PARTIAL_SUFFIX):
        stem = name[1 : -len(PARTIAL_SUFFIX)]
        if stem:
            return run_dir.with_name(stem)
    return run_dir


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_tree(path: Path) -> str:
    """One digest of a file or of every file under a directory: sha256 over each file's path
    (relative; a lone file's name) and sha256, in sorted order, so that a renamed, added or
    changed file changes it."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        h.update(bytes.fromhex(sha256_file(f)))
    return h.hexdigest()


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so a reader sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write to; it replaces `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def list_files(root: Path) -> list[Path]:
    """Every regular file under `root` (sorted, relative), except the manifest and hidden files."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or (dirpath == str(root) and name == MANIFEST):
                continue
            files.append(Path(dirpath, name).relative_to(root))
    return files


def describe_outputs(root: Path) -> list[dict[str, Any]]:
    return [
        {
            "path": rel.as_posix(),
            "sha256": sha256_file(root / rel),
            "bytes": (root / rel).stat().st_size,
        }
        for rel in list_files(root)
    ]


def outputs_digest(outputs: list[dict[str, Any]]) -> str:
    return sha256_bytes(canonical_json([[o["path"], o["sha256"]] for o in outputs]).encode())


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of an artifact directory; ArtifactError if it is missing or unreadable."""
    path = directory / MANIFEST
    if not directory.exists():
        raise ArtifactError(
            f"{directory}: artifact directory not found (run the stage that makes it)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(
            f"{directory}: no {MANIFEST}, so this is not a finished albor artifact "
            "(run the stage that makes it, or re-run it if it was interrupted)"
        ) from None
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: unreadable manifest: {e}") from e
    if not isinstance(data, dict) or "stage" not in data or "outputs" not in data:
        raise ArtifactError(f"{path}: not an albor manifest (no 'stage' or 'outputs')")
    return data


def require_artifact(directory: Path, stage: str | tuple[str, ...]) -> dict[str, Any]:
    """Read the manifest and check the artifact was made by (one of) the expected stage type(s)."""
    manifest = read_manifest(directory)
    wanted = (stage,) if isinstance(stage, str) else stage
    if manifest["stage"] not in wanted:
        raise ArtifactError(
            f"{directory}: made by stage '{manifest['stage']}', expected {' or '.join(wanted)} "
            "(point the input at the right artifact directory)"
        )
    return manifest


def artifact_digest(directory: Path) -> str:
    """The digest of a finished artifact: recorded in its manifest, recomputed if absent. A model
    directory that albor did not make (a transformers checkpoint: config.json, no manifest) is
    digested by its model files (`model_dir_digest`), so a stage can take one as an input."""
    if not (directory / MANIFEST).exists() and (directory / "config.json").is_file():
        return model_dir_digest(directory)
    manifest = read_manifest(directory)
    digest = manifest.get("digest")
    return str(digest) if digest else outputs_digest(manifest["outputs"])


# The files that make a transformers model what it is (weights, config, tokenizer); README,
# .git and caches beside them do not count.
MODEL_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "*.model",
    "*.safetensors",
    "*.safetensors.index.json",
    "*.bin",
    "*.bin.index.json",
)

# sha256 of a big file, by (path, size, mtime): one process (plan, then apply, then the
# provenance record) hashes a multi-GB teacher once.
_HASHED: dict[tuple[str, int, int], str] = {}


def _sha256_cached(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = sha256_file(path)
    return _HASHED[key]


def model_dir_digest(directory: Path) -> str:
    """One digest of a model directory made elsewhere: sha256 over the name and sha256 of each of
    its model files (`MODEL_FILE_PATTERNS`, top level), sorted; another weight, config or
    tokenizer file changes it. ArtifactError if the directory has none of them."""
    files = sorted({f for pat in MODEL_FILE_PATTERNS for f in directory.glob(pat) if f.is_file()})
    if not files:
        raise ArtifactError(
            f"{directory}: neither an albor artifact ({MANIFEST}) nor a model directory "
            "(config.json and weights): point the input at one"
        )
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(bytes.fromhex(_sha256_cached(f)))
    return h.hexdigest()


def outputs_present(directory: Path, manifest: dict[str, Any]) -> bool:
    """True when every output the manifest lists exists with the recorded size (a cheap check)."""
    for out in manifest.get("outputs", []):
        p = directory / out["path"]
        try:
            if p.stat().st_size != out["bytes"]:
                return False
        except OSError:
            return False
    return True


def verify_outputs(directory: Path, manifest: dict[str, Any]) -> dict[str, list[str]]:
    """Re-hash every output; return the paths that are `missing`, `modified` (size or sha256
    differ from the manifest) and `extra` (files the manifest does not list)."""
    listed = {o["path"]: o for o in manifest.get("outputs", [])}
    drift: dict[str, list[str]] = {"missing": [], "modified": [], "extra": []}
    for path, out in listed.items():
        p = directory / path
        if not p.is_file():
            drift["missing"].append(path)
        elif p.stat().st_size != out["bytes"] or sha256_file(p) != out["sha256"]:
            drift["modified"].append(path)
    drift["extra"] = [r.as_posix() for r in list_files(directory) if r.as_posix() not in listed]
    return drift


def find_artifacts(root: Path) -> list[Path]:
    """`root` itself if it is an artifact directory, else every artifact directory below it."""
    if (root / MANIFEST).is_file():
        return [root]
    return sorted(
        p.parent
        for p in root.rglob(MANIFEST)
        if not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
