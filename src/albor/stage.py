"""The stage protocol and the runner that gives every stage the same guarantees.

A stage is a module under `albor.stages` exporting:
  NAME                its type name (as used in manifests and on the command line)
  Config              a `StageConfig` with an `output` field and the input fields listed in INPUTS
  INPUTS              names of the Config fields that are paths to upstream artifacts, in order
  plan(cfg, ctx)      -> Plan: pure checks and estimates
  apply(cfg, ctx)     -> Outcome: writes its files into `ctx.out`
and optionally `source_state(cfg)`, extra fingerprint data for inputs that are not artifacts.
Its one-line description is in `DESCRIPTIONS` here, beside `REGISTRY`, so that `albor --help`
lists every stage without importing one.

`run_stage` plans, skips the work when the fingerprint (stage type + resolved config + input
digests + albor version) matches the existing output, otherwise applies into a `.NAME.partial`
directory beside the output, checks that counts add up, hashes the outputs, writes `manifest.json`
and swaps the directory in atomically, so a failed apply never damages what was there.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from pydantic import Field

from albor import __version__
from albor.artifact import (
    MANIFEST,
    artifact_digest,
    atomic_write_json,
    atomic_write_text,
    canonical_json,
    describe_outputs,
    outputs_digest,
    outputs_present,
    partial_dir,
    read_manifest,
    sha256_bytes,
    verify_outputs,
)
from albor.config import StageConfig
from albor.errors import AlborError, ArtifactError, ConfigError, PlanFailed, StageFailed
from albor.plan import Plan

log = logging.getLogger(__name__)
T = TypeVar("T")

# Stage type -> module; imported lazily so that `plan` of a data stage never pays for torch.
REGISTRY: dict[str, str] = {
    "ingest": "albor.stages.ingest",
    "clean": "albor.stages.clean",
    "dedup": "albor.stages.dedup",
    "decontaminate": "albor.stages.decontaminate",
    "mix": "albor.stages.mix",
    "split": "albor.stages.split",
    "tokenizer": "albor.stages.tokenizer",
    "tokenize": "albor.stages.tokenize",
    "pretrain": "albor.stages.pretrain",
    "distill": "albor.stages.distill",
    "teacher_logits": "albor.stages.teacher_logits",
    "finetune": "albor.stages.finetune",
    "pairs": "albor.stages.pairs",
    "merge": "albor.stages.merge",
    "prune": "albor.stages.prune",
    "quantize": "albor.stages.quantize",
    "evaluate": "albor.stages.evaluate",
    "export": "albor.stages.export",
    "report": "albor.stages.report",
    "publish": "albor.stages.publish",
}

# One line per stage type for `albor --help`; the only copy (a stage module carries none), kept
# here so help never imports a stage.
# The stages that train and resume from checkpoints: `albor STAGE watch` supervises them.
TRAINING_STAGES = ("pretrain", "distill", "finetune")

DESCRIPTIONS: dict[str, str] = {
    "ingest": "Read .py files (stdlib, dirs, globs, git checkouts), Parquet, JSONL or cached HF "
    "datasets into a Parquet corpus.",
    "clean": "Drop documents that fail code-aware quality filters; count every reason.",
    "dedup": "Remove exact and near-duplicate documents (MinHash LSH); one survivor per cluster.",
    "decontaminate": "Drop documents sharing n-grams with benchmark prompts or solutions.",
    "mix": "Mix corpora by upsampling factors or target byte shares, deterministically.",
    "split": "Split a corpus into train / val / test by document (hash of the content).",
    "tokenizer": "Train a ByteLevel BPE tokenizer; verify the round trip on val.",
    "tokenize": "Encode the splits into packed token shards (.npy) with an index.",
    "pretrain": "Pretrain the decoder on token shards; writes an HF-compatible checkpoint.",
    "distill": "Train a student on token shards to match a teacher's next-token distributions.",
    "teacher_logits": "Precompute a teacher's top-k log-probabilities on the train windows for "
    "offline distill.",
    "finetune": "LoRA-finetune a base model on docstring -> body pairs; writes the peft adapter "
    "and the merged model.",
    "pairs": "Mine docstring -> body pairs with `ast`, split by source file, decontaminated.",
    "merge": "Merge checkpoints of one architecture and tokenizer: linear, SLERP, task "
    "arithmetic, TIES, DARE (computed in fp32, cast back).",
    "prune": "Zero weights by magnitude or Wanda (optionally 2:4), or remove blocks; exact "
    "sparsity, val bits/byte before and after.",
    "quantize": "Lower precision: int8 / int4 weight-only for albor's engine, GGUF Q8_0 / Q4_0 / "
    "Q4_K_M (optional importance matrix); size, bits/byte, KL, top-1, ms/token per variant.",
    "evaluate": "Perplexity, pairs bits/byte, HumanEval pass@k and infilling in a sandbox, "
    "custom benchmarks.",
    "export": "Export a checkpoint as an HF dir and GGUF F16 / BF16; check token and top-1 parity.",
    "report": "Write the ladder's report: one HTML page, a Markdown model card and PNG plots "
    "(loss curves, variants, quality against latency, data funnel, provenance, contracts).",
    "publish": "Make a Hub-ready folder per model variant (weights, tokenizer, GGUF, model card); "
    "upload it with huggingface_hub when a token is configured.",
}


class OutputConfig(StageConfig):
    """Base of stage configs: where the artifact goes."""

    output: Path | None = Field(
        None,
        description="Artifact directory this stage writes (set by the pipeline to WORKDIR/STAGE).",
    )


def load_stage(kind: str) -> ModuleType:
    """The module of stage type `kind`; ConfigError naming the known types if there is none."""
    try:
        path = REGISTRY[kind]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise ConfigError(f"unknown stage type '{kind}' (known types: {known})") from None
    return importlib.import_module(path)


@dataclass
class PlanContext:
    """What a plan needs to know beyond its config: inputs an upstream stage has yet to make."""

    pending: dict[str, str] = field(default_factory=dict)

    def is_pending(self, input_field: str) -> bool:
        return input_field in self.pending

    def pending_note(self, input_field: str) -> str:
        return f"will be produced by stage '{self.pending[input_field]}'"


def check_input(
    p: Plan, ctx: PlanContext, name: str, path: Path | None, load: Callable[[Path], T], what: str
) -> T | None:
    """The check every plan makes of an input: set, then either pending (an upstream stage will
    make it) or loadable. Returns what `load` read, or None after adding a pending or failing
    check; the caller adds the ok check with its details."""
    if path is None:
        p.add(name, "fail", f"no {name}: set `{name}:` to {what}")
        return None
    if ctx.is_pending(name):
        p.add(name, "ok", ctx.pending_note(name))
        return None
    try:
        return load(path)
    except ArtifactError as e:
        p.add(name, "fail", str(e))
        return None


@dataclass
class ApplyContext:
    """Where apply writes (`out`, the partial directory) and the stage's name in its pipeline."""

    out: Path
    name: str
    fingerprint: str


@dataclass
class Outcome:
    """What a stage's apply reports back; the runner puts it in the manifest."""

    summary: str = ""
    counts: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    sources: list[dict[str, Any]] = field(default_factory=list)


def counts(total: int, kept: int, rejected: dict[str, int]) -> dict[str, Any]:
    return {"in": total, "kept": kept, "rejected": dict(sorted(rejected.items()))}


def check_counts(name: str, c: dict[str, Any]) -> None:
    """Nothing is lost silently: in == kept + every rejection by reason."""
    rejected = sum(c.get("rejected", {}).values())
    if c["in"] != c["kept"] + rejected:
        raise StageFailed(
            f"{name}: counts do not add up: in {c['in']} != kept {c['kept']} + rejected {rejected} "
            "(this is a bug in albor; please report it)"
        )


def input_fields(module: ModuleType) -> tuple[str, ...]:
    return tuple(getattr(module, "INPUTS", ()))


# Settings that change how a stage runs but not what it writes (its tests hold it to that), left
# out of the fingerprint so that changing them neither re-runs a stage nor discards the progress
# of an interrupted one. `target` (the GPU a training plan is judged against) changes only the plan.
RUNTIME_FIELDS = frozenset({"output", "batch_rows", "workers", "threads", "prefetch", "target"})


def result_config(cfg: StageConfig) -> dict[str, Any]:
    """The config that determines the output: the resolved config less the runtime settings."""
    return cfg.model_dump(mode="json", exclude=set(RUNTIME_FIELDS))


def fingerprint(module: ModuleType, cfg: StageConfig) -> str:
    """Hash of everything that determines the output: type, config, inputs, albor version."""
    config = result_config(cfg)
    inputs = {}
    for name in input_fields(module):
        value = getattr(cfg, name)
        paths = value if isinstance(value, list) else [value]
        inputs[name] = [artifact_digest(Path(p)) if p is not None else None for p in paths]
    source = module.source_state(cfg) if hasattr(module, "source_state") else None
    blob = canonical_json(
        {
            "stage": module.NAME,
            "config": config,
            "inputs": inputs,
            "source": source,
            "albor": __version__,
        }
    )
    return sha256_bytes(blob.encode())


@dataclass
class StageState:
    """Whether a stage's output is up to date, and why not."""

    up_to_date: bool
    reason: str
    fingerprint: str | None = None


def state_of(module: ModuleType, cfg: StageConfig) -> StageState:
    output = require_output(cfg)
    try:
        fp = fingerprint(module, cfg)
    except ArtifactError:
        return StageState(False, "input not ready")
    try:
        manifest = read_manifest(output)
    except ArtifactError:
        return StageState(False, "never ran" if not output.exists() else "output incomplete", fp)
    if manifest.get("fingerprint") != fp:
        old = {k: v for k, v in manifest.get("config", {}).items() if k not in RUNTIME_FIELDS}
        new = result_config(cfg)
        if old != new:
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            return StageState(False, f"config changed ({', '.join(changed)})", fp)
        if manifest.get("versions", {}).get("albor") != __version__:
            return StageState(False, "albor version changed", fp)
        return StageState(False, "input changed", fp)
    if not outputs_present(output, manifest):
        return StageState(False, "output missing or modified", fp)
    return StageState(True, "up to date", fp)


def require_output(cfg: StageConfig) -> Path:
    output = getattr(cfg, "output", None)
    if output is None:
        raise ConfigError(
            "output: required when a stage runs on its own (e.g. --set output=out/NAME)"
        )
    return Path(output)


@dataclass
class RunResult:
    name: str
    status: str  # "ran" | "up to date"
    output: Path
    manifest: dict[str, Any]
    plan: Plan


def versions() -> dict[str, str]:
    found = {"albor": __version__, "python": sys.version.split()[0]}
    for mod in ("torch", "tokenizers", "pyarrow", "numpy"):
        m = sys.modules.get(mod)
        if m is not None:
            found[mod] = str(getattr(m, "__version__", "?"))
    return found


def run_stage(
    module: ModuleType, cfg: StageConfig, *, name: str | None = None, force: bool = False
) -> RunResult:
    """Plan, then apply unless up to date; raise an AlborError on failure."""
    name = name or module.NAME
    output = require_output(cfg)
    plan: Plan = module.plan(cfg, PlanContext())
    if not plan.ok:
        raise PlanFailed(f"{name}: plan failed: {plan.summary()}", plan)
    state = state_of(module, cfg)
    if state.up_to_date and not force:
        return RunResult(name, "up to date", output, read_manifest(output), plan)
    fp = state.fingerprint or fingerprint(module, cfg)
    work = partial_dir(output)
    marker = work / ".fingerprint"
    # Under torchrun only rank 0 writes; the other ranks take part in apply, then wait for the
    # artifact to be in place (torch is imported only when a launch made it necessary).
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:
        if work.exists() and (not marker.exists() or marker.read_text() != fp or force):
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, fp)
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    try:
        outcome: Outcome = module.apply(cfg, ApplyContext(out=work, name=name, fingerprint=fp))
    except AlborError:
        raise
    except KeyboardInterrupt:
        raise
    except Exception as e:
        raise StageFailed(f"{name}: {type(e).__name__}: {e}") from e
    wall = time.perf_counter() - t0
    if not rank0:
        from albor.train import distributed

        if not distributed.active():
            raise StageFailed(f"{name}: this stage does not run under torchrun: run one process")
        distributed.barrier()  # rank 0 has swapped the artifact in
        return RunResult(name, "ran", output, read_manifest(output), plan)
    if outcome.counts is not None:
        check_counts(name, outcome.counts)
    outputs = describe_outputs(work)
    manifest = {
        "albor_manifest": 1,
        "stage": module.NAME,
        "name": name,
        "fingerprint": fp,
        "digest": outputs_digest(outputs),
        "config": cfg.model_dump(mode="json", exclude={"output"}),
        "inputs": _describe_inputs(module, cfg) + outcome.sources,
        "outputs": outputs,
        "counts": outcome.counts,
        "metrics": outcome.metrics,
        "summary": outcome.summary,
        "versions": versions(),
        "started_at": started.isoformat(timespec="seconds"),
        "wall_time_s": round(wall, 3),
    }
    atomic_write_json(work / MANIFEST, manifest)
    _swap_in(work, output)
    # Only now: a kill before the swap must find the marker and keep the partial work.
    (output / marker.name).unlink(missing_ok=True)
    if "RANK" in os.environ:
        from albor.train import distributed

        distributed.barrier()  # the other ranks may now exit
    return RunResult(name, "ran", output, manifest, plan)


def _describe_inputs(module: ModuleType, cfg: StageConfig) -> list[dict[str, Any]]:
    described = []
    for field_name in input_fields(module):
        value = getattr(cfg, field_name)
        for p in value if isinstance(value, list) else [value]:
            if p is not None:
                described.append(
                    {"name": field_name, "path": str(p), "digest": artifact_digest(Path(p))}
                )
    return described


def _swap_in(work: Path, output: Path) -> None:
    """Replace `output` by `work`; the old output is removed only after the new one is in place."""
    old = output.parent / f".{output.name}.old-{os.getpid()}"
    if output.exists():
        os.replace(output, old)
    os.replace(work, output)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def verify_artifact(directory: Path) -> dict[str, Any]:
    """Provenance check of a finished artifact: re-hash its outputs against the manifest, check
    each upstream artifact still has the digest it had, and for a stage that reads outside
    sources (ingest) that each source is unchanged. Drift is listed by kind."""
    manifest = read_manifest(directory)
    drift: dict[str, list[str]] = verify_outputs(directory, manifest)
    drift["inputs"] = []
    for entry in manifest.get("inputs", []):
        path = Path(entry.get("path", ""))
        if "type" in entry or not entry.get("digest"):
            continue
        try:
            now = artifact_digest(path)
        except ArtifactError:
            drift["inputs"].append(f"{path} (gone)")
            continue
        if now != entry["digest"]:
            drift["inputs"].append(f"{path} (changed since this artifact was made)")
    drift["sources"] = []
    module = load_stage(manifest["stage"]) if manifest["stage"] in REGISTRY else None
    if module is not None and hasattr(module, "source_digests"):
        recorded = {e["name"]: e for e in manifest.get("inputs", []) if "type" in e}
        try:
            cfg = module.Config.model_validate(manifest.get("config", {}))
            current = module.source_digests(cfg)
        except (AlborError, ValueError) as e:
            drift["sources"].append(f"cannot re-read the sources: {e}")
            current = {}
        for name, digest in current.items():
            entry = recorded.get(name)
            if entry is not None and entry.get("digest") != digest:
                drift["sources"].append(f"{name}: {entry.get('path')} (changed)")
    return {
        "artifact": str(directory),
        "stage": manifest["stage"],
        "files": len(manifest["outputs"]),
        "ok": not any(drift.values()),
        **drift,
    }
