"""Which files make each Hub folder of `publish`, read from the input artifacts' manifests and
file listings only (the plan's cost), and the guard that keeps a re-run from deleting changes
made by hand to an earlier output.

A *variant* is one folder, one Hub repository:
- a checkpoint artifact (pretrain, distill, finetune, merge or prune output) gives a `model`
  variant named after its directory (the pipeline's node name): config.json, the safetensors
  weights, generation_config.json and the tokenizer files; the export artifact of that checkpoint
  adds its GGUF files and its `hf/` directory (the files whose parity export checked) replaces the
  checkpoint's;
- a quantize artifact gives a `quantized` variant `<source>-gguf`: its GGUF files and its int8 /
  int4 directories;
- a report artifact adds the PNG plots its model card shows to every variant.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from albor.artifact import (
    MANIFEST,
    artifact_digest,
    read_manifest,
    require_artifact,
    sha256_file,
)
from albor.errors import ArtifactError

CHECKPOINT_STAGES = ("pretrain", "distill", "finetune", "merge", "prune")
CARD = "README.md"
GENERATION_CONFIG = "generation_config.json"
REPORT_CARD = "model-card.md"
# Files a model variant may carry beside its weights, in the order a listing shows them.
MODEL_EXTRAS = ("config.json", GENERATION_CONFIG)
IMAGE_SUFFIXES = (".png", ".svg", ".jpg", ".jpeg", ".gif")
# The Hub's rule for a repository name (huggingface_hub's validate_repo_id).
REPO_NAME = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9][\w.-]{0,95}(?<![.-])$")
# Below this size a file is re-hashed even by the plan's cheap check of an existing output: the
# card, the manifests and the JSON files a person edits by hand are all small.
_SMALL = 1 << 20


@dataclass(frozen=True)
class Source:
    """An input artifact that files of a variant come from (the variant's manifest lists it)."""

    role: str  # models, export, quantize, report
    path: Path
    stage: str
    name: str
    digest: str

    def to_json(self) -> dict[str, str]:
        return {
            "name": self.role,
            "stage": self.stage,
            "node": self.name,
            "path": str(self.path),
            "digest": self.digest,
        }


def _source(role: str, path: Path, manifest: dict[str, Any]) -> Source:
    name = str(manifest.get("name", path.name))
    return Source(role, path, str(manifest["stage"]), name, artifact_digest(path))


@dataclass
class ModelInput:
    source: Source
    manifest: dict[str, Any]
    files: dict[str, Path]


@dataclass
class ExportInput:
    source: Source
    model: Path  # the checkpoint it exported
    hf: dict[str, Path]
    ggufs: dict[str, Path]


@dataclass
class QuantizeInput:
    source: Source
    model: Path
    files: dict[str, Path]
    variants: dict[str, dict[str, Any]]  # quantize's metrics.variants


@dataclass
class ReportInput:
    source: Source
    images: dict[str, Path]


@dataclass
class Variant:
    """One folder (one repository): where each of its files comes from."""

    name: str
    kind: Literal["model", "quantized"]
    origin: Path  # the checkpoint this variant is (model) or quantizes (quantized)
    stage: str  # the stage that made the origin
    metrics: dict[str, Any]  # the origin's manifest metrics
    files: dict[str, Path] = field(default_factory=dict)  # path in the folder -> source file
    sources: list[Source] = field(default_factory=list)
    quantized: dict[str, dict[str, Any]] = field(default_factory=dict)
    images: list[str] = field(default_factory=list)

    @property
    def library(self) -> str:
        return "gguf" if self.kind == "quantized" else "transformers"

    @property
    def generated(self) -> list[str]:
        """Files the build writes rather than copies."""
        made = [CARD, MANIFEST]
        if self.kind == "model":
            # Without tokenizer_config.json AutoTokenizer would not know the special tokens.
            made += [f for f in ("tokenizer_config.json",) if f not in self.files]
        return made

    @property
    def ggufs(self) -> list[str]:
        return sorted(f for f in self.files if f.endswith(".gguf"))

    def bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files.values())


def _files_under(directory: Path, prefix: str = "") -> dict[str, Path]:
    """Every non-hidden file under `directory` by its path relative to it (with `prefix`)."""
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fname in sorted(filenames):
            if fname.startswith("."):
                continue
            path = Path(dirpath, fname)
            found[prefix + path.relative_to(directory).as_posix()] = path
    return found


def read_checkpoint(directory: Path) -> ModelInput:
    """A checkpoint artifact's model files; ArtifactError naming what is missing and the fix."""
    from albor.data.bpe import TOKENIZER_FILES, TOKENIZER_JSON
    from albor.model.hf import INDEX_FILE, weight_files

    manifest = require_artifact(directory, CHECKPOINT_STAGES)
    weights = list(weight_files(directory))
    if len(weights) > 1:
        weights.append(INDEX_FILE)
    needed = ["config.json", TOKENIZER_JSON, *weights]
    missing = [f for f in needed if not (directory / f).is_file()]
    if missing:
        raise ArtifactError(
            f"{directory}: no {', '.join(missing)}: a published model needs its config, weights "
            "and tokenizer.json (re-run the stage that made it)"
        )
    names = [*MODEL_EXTRAS, *weights, *TOKENIZER_FILES]
    files = {f: directory / f for f in names if (directory / f).is_file()}
    return ModelInput(_source("models", directory, manifest), manifest, files)


def read_export(directory: Path) -> ExportInput:
    manifest = require_artifact(directory, "export")
    model = Path(manifest.get("config", {}).get("model") or "")
    hf = _files_under(directory / "hf") if (directory / "hf").is_dir() else {}
    ggufs = {p.name: p for p in sorted(directory.glob("*.gguf")) if p.is_file()}
    if not hf and not ggufs:
        raise ArtifactError(
            f"{directory}: neither hf/ nor a .gguf file: nothing to publish from this export "
            "(re-run it with formats [hf, f16])"
        )
    return ExportInput(_source("export", directory, manifest), model, hf, ggufs)


def read_quantize(directory: Path) -> QuantizeInput:
    manifest = require_artifact(directory, "quantize")
    model = Path(manifest.get("config", {}).get("model") or "")
    variants = dict(manifest.get("metrics", {}).get("variants", {}))
    files = {p.name: p for p in sorted(directory.glob("*.gguf")) if p.is_file()}
    for engine in ("int8", "int4"):
        if (directory / engine).is_dir():
            files.update(_files_under(directory / engine, f"{engine}/"))
    if not files:
        raise ArtifactError(
            f"{directory}: no .gguf file and no int8/ or int4/ directory: nothing to publish "
            "from this quantize output"
        )
    return QuantizeInput(_source("quantize", directory, manifest), model, files, variants)


_MD_IMAGE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?")
_HTML_IMAGE = re.compile(r"<img\b[^>]*\bsrc=[\"']([^\"']+)[\"']", re.IGNORECASE)


def read_report(directory: Path) -> ReportInput:
    """The report's plots: the images its model card shows, or every image when it has none."""
    manifest = require_artifact(directory, "report")
    root = directory.resolve()
    card = directory / REPORT_CARD
    images: dict[str, Path] = {}
    if card.is_file():
        text = card.read_text(encoding="utf-8")
        for link in [*_MD_IMAGE.findall(text), *_HTML_IMAGE.findall(text)]:
            if "://" in link or link.startswith(("/", "data:")):
                continue
            path = (directory / link).resolve()
            if path.is_file() and path.is_relative_to(root):
                images[path.relative_to(root).as_posix()] = directory / path.relative_to(root)
    else:
        images = {
            rel: p for rel, p in _files_under(directory).items() if p.suffix in IMAGE_SUFFIXES
        }
    return ReportInput(_source("report", directory, manifest), images)


def _same(a: Path, b: Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b) or (
        a.exists() and b.exists() and a.resolve() == b.resolve()
    )


def assemble(
    models: list[ModelInput],
    export: ExportInput | None,
    quantize: QuantizeInput | None,
    report: ReportInput | None,
) -> list[Variant]:
    """The variants the inputs make, in input order; ArtifactError when two share a name."""
    variants: list[Variant] = []
    for m in models:
        v = Variant(
            m.source.path.name,
            "model",
            m.source.path,
            m.source.stage,
            dict(m.manifest.get("metrics") or {}),
        )
        v.files.update(m.files)
        v.sources.append(m.source)
        variants.append(v)
    if export is not None:
        target = next((v for v in variants if _same(v.origin, export.model)), None)
        if target is None:
            # The export of a checkpoint not listed in `models` is a variant of its own.
            origin = read_manifest(export.model) if (export.model / MANIFEST).is_file() else {}
            target = Variant(
                export.model.name,
                "model",
                export.model,
                str(origin.get("stage", "export")),
                dict(origin.get("metrics") or {}),
            )
            variants.append(target)
        if export.hf:
            # export's hf/ is the checkpoint as export wrote and parity-checked it.
            for rel in [r for r in target.files if not r.endswith(".gguf")]:
                del target.files[rel]
            target.files.update(export.hf)
        target.files.update(export.ggufs)
        target.sources.append(export.source)
    if quantize is not None:
        v = Variant(
            f"{quantize.model.name}-gguf",
            "quantized",
            quantize.model,
            "quantize",
            dict(quantize.variants),
        )
        v.files.update(quantize.files)
        v.sources.append(quantize.source)
        v.quantized = quantize.variants
        variants.append(v)
    names = [v.name for v in variants]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ArtifactError(
            f"two inputs make a folder named {', '.join(twice)}: list each checkpoint once in "
            "`models` (folders are named after the artifact directories)"
        )
    if report is not None:
        for v in variants:
            clash = [rel for rel in report.images if rel in v.files]
            if clash:
                raise ArtifactError(
                    f"{report.source.path}: plot {clash[0]} has the name of a model file of "
                    f"{v.name}: rename it in the report"
                )
            v.files.update(report.images)
            v.images = list(report.images)
            v.sources.append(report.source)
    return variants


def repo_name(prefix: str, variant: str) -> str:
    return f"{prefix}-{variant}" if prefix else variant


def repo_id(namespace: str | None, prefix: str, variant: str) -> str:
    name = repo_name(prefix, variant)
    return f"{namespace}/{name}" if namespace else name


# ---------------------------------------------------------------------------------------------
# building a folder


def place(src: Path, dest: Path) -> None:
    """Put a copy of `src` at `dest`: a hard link where the filesystem allows (checkpoints are
    large and an artifact is never changed in place: stages replace whole directories), else a
    copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() or dest.is_symlink():
        dest.unlink()
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def describe_files(folder: Path) -> list[dict[str, Any]]:
    """Every file of a built folder with its sha256 and size (the manifest's own included)."""
    return [
        {"path": rel, "sha256": sha256_file(p), "bytes": p.stat().st_size}
        for rel, p in _files_under(folder).items()
    ]


# ---------------------------------------------------------------------------------------------
# an existing output


def _all_entries(root: Path) -> list[str]:
    """Every file under `root`, hidden ones too (a `.git` made by hand is work too)."""
    found = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for fname in filenames:
            found.append(Path(dirpath, fname).relative_to(root).as_posix())
    return sorted(found)


def output_changes(output: Path, *, thorough: bool) -> str | None:
    """Why replacing `output` would lose something, or None when it would not.

    The runner swaps a new output in whole and deletes the old one, so anything in it that
    publish did not write (a folder of someone else's, an edited card, an added file) would be
    lost. Missing files are not a loss: the build writes them again. `thorough` re-hashes every
    file; otherwise sizes, and the content of the small files, are compared (the plan's cost).
    """
    if not output.exists():
        return None
    if not output.is_dir():
        return (
            f"output {output} is a file, not a folder: move it away or set `output:` to a new "
            "directory"
        )
    entries = _all_entries(output)
    if not entries:
        return None
    try:
        manifest = read_manifest(output)
    except ArtifactError:
        return (
            f"output {output} exists and was not made by publish (no {MANIFEST}); publish "
            "replaces its output folder whole, which would delete its {n} file(s): move them "
            "away or set `output:` to a new directory".replace("{n}", str(len(entries)))
        )
    if manifest.get("stage") != "publish":
        return (
            f"output {output} is the output of stage '{manifest.get('stage')}', not publish: "
            "set `output:` to another directory"
        )
    listed = {o["path"]: o for o in manifest.get("outputs", [])}
    modified: list[str] = []
    for rel, out in listed.items():
        p = output / rel
        if not p.is_file():
            continue
        size = p.stat().st_size
        if size != out["bytes"] or (
            (thorough or size <= _SMALL) and sha256_file(p) != out["sha256"]
        ):
            modified.append(rel)
    extra = [e for e in entries if e not in listed and e != MANIFEST]
    if not modified and not extra:
        return None

    def some(items: list[str]) -> str:
        more = f" and {len(items) - 5} more" if len(items) > 5 else ""
        return ", ".join(items[:5]) + more

    changes = "; ".join(
        f"{what}: {some(items)}"
        for what, items in (("changed", modified), ("added", extra))
        if items
    )
    return (
        f"output {output} was changed after publish wrote it ({changes}); a new build replaces "
        "the folder whole and would lose that: copy what you want to keep elsewhere and delete "
        "it there (or restore the files), or set `output:` to a new directory; nothing was "
        "changed"
    )
