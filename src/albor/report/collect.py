"""A pipeline workdir read into typed data: what the report shows and nothing it draws.

`collect(workdir)` reads `pipeline.json` (the stages expected, in order), `.albor-pipeline.json`
(each stage's last status and error) and every stage's `manifest.json` and `metrics.jsonl`. It
never raises for a damaged or missing stage: such a stage is listed with its status and the
reason, and everything that exists is still read. It raises `ConfigError` only when the workdir
does not exist or holds no stage at all.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from albor.artifact import MANIFEST, partial_dir, read_manifest
from albor.errors import AlborError, ArtifactError, ConfigError
from albor.pipeline import LAYOUT_FILE, STATE_FILE
from albor.track.metrics import METRICS_FILE

TRAINING_KINDS = ("pretrain", "distill", "finetune")
# Stages whose `counts` are documents (or pairs' functions) flowing through the data funnel.
FUNNEL_KINDS = ("ingest", "clean", "dedup", "decontaminate", "mix", "split", "tokenize", "pairs")
FUNNEL_UNITS = {"pairs": "functions", "ingest": "files"}
MODEL_KINDS = ("pretrain", "distill", "finetune", "merge", "prune", "quantize")


@dataclass
class StageInfo:
    """One expected (or found) stage and what became of it."""

    name: str
    kind: str | None
    status: str  # done | failed | missing | partial
    detail: str  # the error, or why it is missing, or the manifest's summary
    needs: list[str] = field(default_factory=list)
    manifest: dict[str, Any] | None = None


@dataclass
class Curve:
    """The loss curve of one training stage: train loss by step, val loss and bits/byte by step."""

    stage: str
    kind: str
    train: list[tuple[int, float]]
    val_loss: list[tuple[int, float]]
    val_bpb: list[tuple[int, float]]


@dataclass
class Variant:
    """One evaluated model variant: the row of the variants table and a bar of the ladder."""

    name: str
    eval_stage: str
    model_stage: str | None
    val_bpb: float | None
    pairs_bpb: float | None
    pass_at_1: float | None
    infill_em: float | None
    decode_ms: float | None
    parameters: int | None
    size_bytes: int | None


@dataclass
class QuantVariant:
    """One variant of the quantize stage, as that stage measured it."""

    name: str
    val_bpb: float | None
    kl_mean: float | None
    top1: float | None
    decode_ms: float | None
    bytes_disk: int | None


@dataclass
class FunnelStep:
    """One data stage's counts: documents (or files, functions) and bytes in, kept, rejected."""

    stage: str
    kind: str
    unit: str
    docs_in: int
    kept: int
    rejected: dict[str, int]
    bytes_in: int | None
    bytes_kept: int | None
    rejected_bytes: dict[str, int]
    balanced: bool
    note: str


@dataclass
class Provenance:
    """What made one artifact: kind, digest, inputs with their digests, config, wall time."""

    name: str
    kind: str
    digest: str
    inputs: list[dict[str, Any]]
    config: dict[str, Any]
    wall_time_s: float | None
    started_at: str | None
    versions: dict[str, str]


@dataclass
class ContractRow:
    """One falsification contract as `albor.evals.contracts` decided it."""

    id: str
    title: str
    status: str
    figure: str
    evidence: str


@dataclass
class Report:
    """Everything the page and the model card show, as read from one workdir."""

    workdir: Path
    name: str
    description: str
    stages: list[StageInfo]
    curves: list[Curve]
    variants: list[Variant]
    quantize: list[QuantVariant]
    quantize_stage: str | None
    funnel: list[FunnelStep]
    provenance: list[Provenance]
    contracts: list[ContractRow] | None  # None: the contracts module could not judge them
    contracts_note: str
    final_model: str | None  # the ladder's final model stage (what export or publish shipped)

    @property
    def problems(self) -> list[StageInfo]:
        """Stages that are failed, missing or partial."""
        return [s for s in self.stages if s.status != "done"]

    def best_variant(self) -> Variant | None:
        """The evaluated variant with the lowest validation bits/byte."""
        rated = [v for v in self.variants if v.val_bpb is not None]
        return min(rated, key=lambda v: v.val_bpb or 0.0) if rated else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["workdir"] = str(self.workdir)
        data["problems"] = [s.name for s in self.problems]
        for s in data["stages"]:
            s.pop("manifest")  # provenance carries what matters of it
        return data


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _dig(data: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(k)
    return data


# ----- stages -------------------------------------------------------------------------------


def _layout(workdir: Path) -> tuple[str, str, list[dict[str, Any]]]:
    """Name, description and the expected stages (name, uses, needs) from pipeline.json; the
    stages are empty when there is no readable pipeline.json."""
    data = _read_json(workdir / LAYOUT_FILE)
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
        return workdir.name, "", []
    stages = [s for s in data["stages"] if isinstance(s, dict) and isinstance(s.get("name"), str)]
    return str(data.get("name") or workdir.name), str(data.get("description") or ""), stages


def _downstream(stages: list[dict[str, Any]], of: set[str]) -> set[str]:
    """`of` and every stage that needs one of them, directly or not."""
    found = set(of)
    for s in stages:  # topological order: one pass suffices
        if any(n in found for n in s.get("needs") or []):
            found.add(s["name"])
    return found


def _stage(
    workdir: Path, name: str, kind: str | None, needs: list[str], state: dict[str, Any]
) -> StageInfo:
    directory = workdir / name
    entry = state.get(name) if isinstance(state.get(name), dict) else {}
    assert isinstance(entry, dict)
    recorded = entry.get("status")
    manifest: dict[str, Any] | None = None
    problem = ""
    try:
        manifest = read_manifest(directory)
    except ArtifactError as e:
        problem = str(e)
    if manifest is not None:
        kind = str(manifest.get("stage") or kind)
    if recorded == "failed":
        error = str(entry.get("error") or "failed (no error recorded)")
        if manifest is not None:
            error += " (an earlier run's artifact is still there and is shown)"
        return StageInfo(name, kind, "failed", error, needs, manifest)
    if manifest is not None:
        return StageInfo(name, kind, "done", str(manifest.get("summary") or ""), needs, manifest)
    if partial_dir(directory).exists() or directory.exists():
        why = f"stopped ({recorded})" if recorded in ("running", "stopped") else "unfinished"
        detail = f"{why}: {problem}" if directory.exists() else f"{why}: work in progress only"
        return StageInfo(name, kind, "partial", detail, needs, None)
    why = "never ran" if recorded is None else f"last status {recorded}, no artifact"
    return StageInfo(name, kind, "missing", f"{why}: no {directory}", needs, None)


def read_stages(workdir: Path, skip: str | None = None) -> tuple[str, str, list[StageInfo]]:
    """Name, description and every stage of `workdir`: the expected ones of pipeline.json in
    order, then any other artifact directory found. The report being drawn (`skip`, the report
    stage's own name, and else every stage of kind `report`) and the stages after it are left
    out: they cannot have run when it draws."""
    if not workdir.is_dir():
        raise ConfigError(f"{workdir}: no such workdir: give the pipeline's workdir directory")
    name, description, layout = _layout(workdir)
    state = _read_json(workdir / STATE_FILE)
    state = state if isinstance(state, dict) else {}
    reports = {skip} if skip else {s["name"] for s in layout if s.get("uses") == "report"}
    excluded = _downstream(layout, reports)
    stages = [
        _stage(workdir, s["name"], s.get("uses"), list(s.get("needs") or []), state)
        for s in layout
        if s["name"] not in excluded
    ]
    known = {s.name for s in stages} | excluded
    found = sorted(
        p.parent.name
        for p in workdir.glob(f"*/{MANIFEST}")
        if not p.parent.name.startswith(".") and p.parent.name not in known
    )
    found += sorted(n for n in state if n not in known and n not in found)
    # Without pipeline.json the run order is the best order known: when each stage started.
    extra = sorted(
        (_stage(workdir, n, None, [], state) for n in found),
        key=lambda s: str(_dig(s.manifest, "started_at") or _dig(state, s.name, "started_at")),
    )
    stages += extra
    if not any(s.status != "missing" or s.name in state for s in stages):
        raise ConfigError(
            f"{workdir}: holds no stage (no pipeline.json, no artifact directory with a "
            f"{MANIFEST}): point at the workdir of `albor pipeline apply`"
        )
    return name, description, stages


# ----- what the stages measured -------------------------------------------------------------


def read_curve(stage: StageInfo, workdir: Path) -> Curve | None:
    """The metrics.jsonl curve of a training stage; None when it has no step lines."""
    path = workdir / stage.name / METRICS_FILE
    train: list[tuple[int, float]] = []
    val_loss: list[tuple[int, float]] = []
    val_bpb: list[tuple[int, float]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill: the rest of the curve still counts
        step = _int(row.get("step")) if isinstance(row, dict) else None
        if step is None:
            continue
        assert isinstance(row, dict)
        for key, series in (("loss", train), ("val_loss", val_loss), ("val_bpb", val_bpb)):
            value = _number(row.get(key))
            if value is not None:
                series.append((step, value))
    if not train and not val_loss:
        return None
    return Curve(stage.name, stage.kind or "?", train, val_loss, val_bpb)


def _local(workdir: Path, path: Any) -> Path | None:
    """An input path of a manifest, found again if the workdir moved since it ran."""
    if not isinstance(path, str):
        return None
    p = Path(path)
    if p.exists():
        return p
    moved = workdir / p.name
    return moved if moved.exists() else None


def _input(manifest: dict[str, Any], name: str) -> dict[str, Any] | None:
    for i in manifest.get("inputs") or []:
        if isinstance(i, dict) and i.get("name") == name:
            return i
    return None


def safetensors_parameters(directory: Path) -> int | None:
    """Parameters stored in a checkpoint dir's safetensors files, from their headers only."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        try:
            with f.open("rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
        except (OSError, ValueError, struct.error):
            return None
        for key, t in header.items():
            if key != "__metadata__" and isinstance(t, dict):
                total += math.prod(t.get("shape") or [1])
    return total


def _weights_bytes(directory: Path) -> int | None:
    files = [*directory.glob("*.safetensors"), *directory.glob("*.gguf")]
    return sum(f.stat().st_size for f in files) if files else None


def _model_figures(
    workdir: Path, manifest: dict[str, Any], by_dir: dict[Path, StageInfo]
) -> tuple[str | None, int | None, int | None]:
    """The evaluated model's stage name, parameters and weight bytes on disk."""
    model = _input(manifest, "model")
    directory = _local(workdir, model.get("path")) if model else None
    if directory is None:
        return None, None, None
    source = by_dir.get(directory.resolve())
    stage_name = source.name if source else directory.name
    variant = _dig(manifest, "config", "variant")
    if isinstance(variant, str) and variant:
        # A quantize stage's int8 / int4 dir: its weights are packed, so the parameters are the
        # quantize stage's source model's.
        size = _weights_bytes(directory / variant)
        src = _input(source.manifest, "model") if source and source.manifest else None
        src_dir = _local(workdir, src.get("path")) if src else None
        params = safetensors_parameters(src_dir) if src_dir else None
        return f"{stage_name}:{variant}", params, size
    return stage_name, safetensors_parameters(directory), _weights_bytes(directory)


def variant_name(stage: StageInfo, model_stage: str | None) -> str:
    """`eval-<variant>` names its variant; any other evaluate stage takes its model's name."""
    if stage.name.startswith("eval-") and len(stage.name) > len("eval-"):
        return stage.name[len("eval-") :]
    return model_stage or stage.name


def read_variant(stage: StageInfo, workdir: Path, by_dir: dict[Path, StageInfo]) -> Variant:
    manifest = stage.manifest or {}
    m = manifest.get("metrics") or {}
    model_stage, params, size = _model_figures(workdir, manifest, by_dir)
    infill = m.get("humaneval-infill")
    em = _number(_dig(infill, "single-line", "psm", "exact_match"))
    if em is None and isinstance(infill, dict):  # another mode or kind: the first exact match
        for kind in infill.values():
            for mode in kind.values() if isinstance(kind, dict) else []:
                if em is None:
                    em = _number(_dig(mode, "exact_match"))
    return Variant(
        name=variant_name(stage, model_stage),
        eval_stage=stage.name,
        model_stage=model_stage,
        val_bpb=_number(_dig(m, "perplexity", "bits_per_byte")),
        pairs_bpb=_number(_dig(m, "pairs", "bits_per_byte")),
        pass_at_1=_number(_dig(m, "humaneval", "pass@1")),
        infill_em=em,
        decode_ms=_number(_dig(m, "speed", "decode_ms_per_token")),
        parameters=params,
        size_bytes=size,
    )


def read_quantize(stage: StageInfo) -> list[QuantVariant]:
    variants = _dig(stage.manifest, "metrics", "variants")
    if not isinstance(variants, dict):
        return []
    return [
        QuantVariant(
            name=str(name),
            val_bpb=_number(v.get("val_bpb")),
            kl_mean=_number(v.get("kl_mean")),
            top1=_number(v.get("top1_agreement")),
            decode_ms=_number(v.get("decode_ms_per_token")),
            bytes_disk=_int(v.get("bytes_disk")),
        )
        for name, v in variants.items()
        if isinstance(v, dict)
    ]


def _sum_ints(value: Any) -> int | None:
    if isinstance(value, dict):
        ints = [_int(v) for v in value.values()]
        return sum(i for i in ints if i is not None) if ints and None not in ints else None
    return _int(value)


def read_funnel(stage: StageInfo) -> FunnelStep | None:
    """One data stage's counts and bytes; the arithmetic in == kept + rejected checked."""
    manifest = stage.manifest or {}
    c = manifest.get("counts")
    if not isinstance(c, dict) or _int(c.get("in")) is None or _int(c.get("kept")) is None:
        return None
    rejected = {str(k): v for k, v in (c.get("rejected") or {}).items() if _int(v) is not None}
    docs_in, kept = int(c["in"]), int(c["kept"])
    m = manifest.get("metrics") or {}
    rejected_bytes = {str(k): v for k, v in (m.get("rejected_bytes") or {}).items() if _int(v)}
    bytes_kept = _int(m.get("bytes_kept"))
    bytes_in = _int(m.get("bytes_in"))
    if bytes_kept is None and stage.kind in ("split", "tokenize"):
        # These write their documents per split; nothing is rejected, so bytes in == kept.
        bytes_kept = _sum_ints(m.get("bytes"))
        bytes_in = bytes_kept if not rejected else None
    total_rejected = sum(rejected.values())
    balanced = docs_in == kept + total_rejected
    note = (
        ""
        if balanced
        else f"counts do not add up: in {docs_in} != kept {kept} + rejected {total_rejected}"
    )
    return FunnelStep(
        stage=stage.name,
        kind=stage.kind or "?",
        unit=FUNNEL_UNITS.get(stage.kind or "", "documents"),
        docs_in=docs_in,
        kept=kept,
        rejected=rejected,
        bytes_in=bytes_in,
        bytes_kept=bytes_kept,
        rejected_bytes=rejected_bytes,
        balanced=balanced,
        note=note,
    )


def read_provenance(stage: StageInfo) -> Provenance:
    m = stage.manifest or {}
    inputs = [
        {"name": i.get("name"), "path": i.get("path"), "digest": i.get("digest")}
        for i in m.get("inputs") or []
        if isinstance(i, dict)
    ]
    return Provenance(
        name=stage.name,
        kind=stage.kind or "?",
        digest=str(m.get("digest") or ""),
        inputs=inputs,
        config=config if isinstance(config := m.get("config"), dict) else {},
        wall_time_s=_number(m.get("wall_time_s")),
        started_at=str(m["started_at"]) if m.get("started_at") else None,
        versions={str(k): str(v) for k, v in (m.get("versions") or {}).items()},
    )


def read_contracts(workdir: Path) -> tuple[list[ContractRow] | None, str]:
    """The nine falsification contracts, or None and the reason they could not be judged."""
    try:
        from albor.evals.contracts import evaluate_contracts
    except ModuleNotFoundError as e:
        if e.name != "albor.evals.contracts":
            raise
        return None, "contracts: unavailable (this albor has no albor.evals.contracts)"
    try:
        contracts = evaluate_contracts(workdir)
    except AlborError as e:  # the page still renders; it says why the table is empty
        return None, f"contracts: could not be judged: {e}"
    rows = [ContractRow(c.id, c.title, c.status, c.figure, c.evidence) for c in contracts]
    return rows, f"{sum(r.status == 'holds' for r in rows)} of {len(rows)} hold"


def _final_model(stages: list[StageInfo], workdir: Path) -> str | None:
    """The stage whose model the ladder ships: export's model input, else the last model stage
    that is not a quantize stage."""
    by_dir = {(workdir / s.name).resolve(): s for s in stages}
    for s in stages:
        if s.kind == "export" and s.manifest:
            model = _input(s.manifest, "model")
            directory = _local(workdir, model.get("path")) if model else None
            if directory is not None and directory.resolve() in by_dir:
                return by_dir[directory.resolve()].name
    models = [s.name for s in stages if s.kind in MODEL_KINDS and s.kind != "quantize"]
    return models[-1] if models else None


def collect(workdir: Path, skip: str | None = None) -> Report:
    """Read `workdir` into a Report (see the module docstring); `skip`: the report stage's own
    name, left out with the stages after it (default: every report stage of pipeline.json)."""
    workdir = Path(workdir)
    name, description, stages = read_stages(workdir, skip)
    done = [s for s in stages if s.manifest is not None]
    by_dir = {(workdir / s.name).resolve(): s for s in done}
    curves = [
        c for s in done if s.kind in TRAINING_KINDS if (c := read_curve(s, workdir)) is not None
    ]
    variants = [read_variant(s, workdir, by_dir) for s in done if s.kind == "evaluate"]
    quant_stage = next((s for s in done if s.kind == "quantize"), None)
    funnel = [f for s in done if s.kind in FUNNEL_KINDS if (f := read_funnel(s)) is not None]
    contracts, note = read_contracts(workdir)
    return Report(
        workdir=workdir,
        name=name,
        description=description,
        stages=stages,
        curves=curves,
        variants=variants,
        quantize=read_quantize(quant_stage) if quant_stage else [],
        quantize_stage=quant_stage.name if quant_stage else None,
        funnel=funnel,
        provenance=[read_provenance(s) for s in done],
        contracts=contracts,
        contracts_note=note,
        final_model=_final_model(stages, workdir),
    )
