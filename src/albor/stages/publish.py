"""publish: a Hub-ready folder per model variant of the ladder, and its upload.

Inputs: `models` (checkpoint artifacts: pretrain, distill, finetune, merge or prune outputs;
each is one folder named after its directory, the pipeline's node name), `export` (its hf/ and
GGUF files join the folder of the checkpoint it exported), `quantize` (its GGUF files and int8 /
int4 directories make a folder `<source>-gguf`) and `report` (the plots its model card shows go
into every folder). Each folder OUT/<variant>/ holds the weights (config.json +
model.safetensors, loadable with transformers' AutoModelForCausalLM), the tokenizer files, GGUF
files where any, README.md (the model card: huggingface_hub `ModelCard` whose metadata holds the
variant's evaluation results, from the workdir's evaluate stages), the plots, and manifest.json
(every file with its sha256, and the digests of the artifacts they came from).
OUT/publish.json maps each variant to its repository, its files (sha256, bytes), whether it was
uploaded and its URL. `albor.publish` has the layout, the card and the upload.

With `upload: true` apply builds the folders, then uploads each (huggingface_hub `create_repo`
with exist_ok, then `upload_folder`) to `endpoint` (default HF_ENDPOINT or the Hub) with the
token in `$token_env`. No token, no network or an HTTP error stops it with one line that names
the endpoint and the status; the folders stay in the work directory the line names, and running
again (once fixed) builds and uploads them again.

The runner replaces an existing output whole; publish refuses (plan and apply) when that would
lose something: an output folder publish did not make, or one changed by hand since.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, field_validator, model_validator

from albor.artifact import (
    MANIFEST,
    atomic_write_json,
    outputs_digest,
    read_manifest,
)
from albor.errors import ArtifactError, StageFailed
from albor.plan import Plan
from albor.publish import card as cards
from albor.publish import layout
from albor.publish.upload import (
    UploadFailed,
    read_token,
    resolve_endpoint,
    upload_folder,
)
from albor.stage import ApplyContext, Outcome, OutputConfig, PlanContext, check_input

NAME = "publish"
INPUTS = ("models", "export", "quantize", "report")
RECORD = "publish.json"

_PREFIX = re.compile(r"^[\w.-]*$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _as_list(value: Any) -> Any:
    """A single path (as a pipeline `needs:` of one stage gives it) is a list of one."""
    return [value] if isinstance(value, str | Path) else value


class Config(OutputConfig):
    models: Annotated[list[Path], BeforeValidator(_as_list)] = Field(
        default_factory=list,
        description="Checkpoint artifacts to publish (pretrain, distill, finetune, merge or prune "
        "outputs); each becomes a folder (and a repository) named after its directory.",
    )
    export: Path | None = Field(
        None,
        description="Export artifact: its hf/ directory and GGUF files go into the folder of the "
        "checkpoint it exported.",
    )
    quantize: Path | None = Field(
        None,
        description="Quantize artifact: its GGUF files and int8 / int4 directories make a folder "
        "of their own, `<source>-gguf`.",
    )
    report: Path | None = Field(
        None, description="Report artifact: the plots of its model card go into every folder."
    )
    repo_prefix: str = Field(
        "albor", description="Repository names are `<repo_prefix>-<variant>` ('' for none)."
    )
    namespace: str | None = Field(
        None,
        description="User or organisation the repositories belong to (default: the token's user).",
    )
    private: bool = Field(False, description="Create the repositories private.")
    upload: bool = Field(
        False, description="Upload the folders; false builds them only (and needs no token)."
    )
    endpoint: str | None = Field(
        None,
        description="Hub endpoint URL (default: huggingface_hub's, i.e. $HF_ENDPOINT or "
        "https://huggingface.co).",
    )
    token_env: str = Field(
        "HF_TOKEN", description="Environment variable holding the write token (never printed)."
    )
    license: str = Field("apache-2.0", description="License named in every model card.")

    @field_validator("repo_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not _PREFIX.match(v) or len(v) > 64:
            raise ValueError(
                f"repo_prefix {v!r}: use letters, digits, '-', '_' and '.' only (at most 64)"
            )
        return v

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str | None) -> str | None:
        if v is not None and not layout.REPO_NAME.match(v):
            raise ValueError(
                f"namespace {v!r}: a Hub user or organisation name (letters, digits, '-', '_', '.')"
            )
        return v

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"endpoint {v!r}: give a URL, e.g. https://huggingface.co")
        return v

    @field_validator("token_env")
    @classmethod
    def _token_env(cls, v: str) -> str:
        if not _ENV.match(v):
            raise ValueError(
                f"token_env {v!r}: the name of an environment variable (e.g. HF_TOKEN), not "
                "the token"
            )
        return v

    @model_validator(mode="after")
    def _something(self) -> Config:
        if not self.models and self.export is None and self.quantize is None:
            raise ValueError(
                "nothing to publish: set `models:` (checkpoint artifacts), `export:` or `quantize:`"
            )
        return self


@dataclass
class Inputs:
    models: list[layout.ModelInput]
    export: layout.ExportInput | None
    quantize: layout.QuantizeInput | None
    report: layout.ReportInput | None

    def variants(self) -> list[layout.Variant]:
        return layout.assemble(self.models, self.export, self.quantize, self.report)


def _read_inputs(p: Plan, cfg: Config, ctx: PlanContext) -> Inputs | None:
    """Every input read, with a check each; None when one is pending or unreadable."""
    complete = True
    models: list[layout.ModelInput] = []
    if ctx.is_pending("models"):
        p.add("models", "ok", ctx.pending_note("models"))
        complete = False
    else:
        for i, path in enumerate(cfg.models):
            m = check_input(
                p, ctx, f"models[{i}]", path, layout.read_checkpoint, "a checkpoint artifact"
            )
            if m is None:
                complete = False
                continue
            models.append(m)
            p.add(f"models[{i}]", "ok", f"{path} ({m.source.stage}, {len(m.files)} files)")
    found: dict[str, Any] = {}
    readers = {
        "export": (layout.read_export, "an export artifact"),
        "quantize": (layout.read_quantize, "a quantize artifact"),
        "report": (layout.read_report, "a report artifact"),
    }
    for name, (read, what) in readers.items():
        path = getattr(cfg, name)
        if path is None:
            continue
        got = check_input(p, ctx, name, path, read, what)
        if got is None:
            complete = False
            continue
        found[name] = got
        p.add(name, "ok", f"{path}: {_describe(got)}")
    if not complete:
        return None
    return Inputs(models, found.get("export"), found.get("quantize"), found.get("report"))


def _describe(got: Any) -> str:
    if isinstance(got, layout.ExportInput):
        return f"hf/ with {len(got.hf)} files; {', '.join(got.ggufs) or 'no GGUF'}"
    if isinstance(got, layout.QuantizeInput):
        made = [v for v in got.variants if v != "full"]
        return f"{len(got.files)} files of {', '.join(made) or 'its variants'}"
    return f"{len(got.images)} plots"


def _roots(cfg: Config) -> list[Path]:
    """The directories the inputs live in: the workdir whose evaluate stages are searched."""
    paths = [*cfg.models, cfg.export, cfg.quantize, cfg.report]
    roots: list[Path] = []
    for path in paths:
        if path is not None and Path(path).parent not in roots:
            roots.append(Path(path).parent)
    return roots


def _evaluated(cfg: Config) -> list[cards.Evaluation]:
    """The evaluations of the workdir that scored a model this config publishes."""
    targets = [Path(m) for m in cfg.models]
    for path in (cfg.export, cfg.quantize):
        if path is None:
            continue
        targets.append(Path(path))
        if (Path(path) / MANIFEST).is_file():
            try:
                model = read_manifest(Path(path)).get("config", {}).get("model")
            except ArtifactError:
                model = None
            if model:
                targets.append(Path(model))
    return [
        e
        for e in cards.find_evaluations(_roots(cfg))
        if any(cards._same(e.model, t) for t in targets)
    ]


def source_state(cfg: Config) -> dict[str, Any]:
    """The evaluations the cards quote are not inputs of the stage: their digests go into the
    fingerprint, so a re-scored model gets a new card."""
    return {"evaluations": {e.name: e.digest for e in _evaluated(cfg)}}


def _repo(cfg: Config, variant: str) -> str:
    return layout.repo_id(cfg.namespace, cfg.repo_prefix, variant)


def plan(cfg: Config, ctx: PlanContext | None = None) -> Plan:
    ctx = ctx or PlanContext()
    p = Plan(NAME)
    inputs = _read_inputs(p, cfg, ctx)
    if cfg.output is not None:
        problem = layout.output_changes(cfg.output, thorough=False)
        p.require(
            "output",
            problem is None,
            f"{cfg.output}"
            + (" (an earlier publish, unchanged: replaced)" if cfg.output.exists() else ""),
            problem or "",
        )
    endpoint = resolve_endpoint(cfg.endpoint)
    token = read_token(cfg.token_env)
    if cfg.upload:
        p.warn_if(
            "token",
            token is None,
            f"no token in ${cfg.token_env}: apply will build the folders, then stop before "
            f"uploading (set {cfg.token_env}, or upload: false)",
            f"a token is set in ${cfg.token_env} (not shown)",
        )
    else:
        p.add(
            "token",
            "ok",
            f"upload: false, so no token is needed ({'one is' if token else 'none is'} set in "
            f"${cfg.token_env})",
        )
    if inputs is None:
        return p
    try:
        variants = inputs.variants()
    except ArtifactError as e:
        p.add("variants", "fail", str(e))
        return p
    bad = [
        layout.repo_name(cfg.repo_prefix, v.name)
        for v in variants
        if not layout.REPO_NAME.match(layout.repo_name(cfg.repo_prefix, v.name))
    ]
    p.require(
        "repo names",
        not bad,
        f"{len(variants)} repositories",
        f"not valid Hub repository names: {', '.join(bad)} (letters, digits, '-', '_', '.'; "
        "at most 96; no '--' or '..'): rename the stages or change repo_prefix",
    )
    evaluations = _evaluated(cfg)
    repos: dict[str, Any] = {}
    for v in variants:
        scored = cards.evaluations_of(v, evaluations)
        repos[_repo(cfg, v.name)] = {
            "variant": v.name,
            "files": len(v.files) + len(v.generated),
            "bytes": v.bytes(),
            "ggufs": v.ggufs,
            "evaluations": [e.name for e in scored],
        }
        p.warn_if(
            f"evaluation {v.name}",
            not scored and not v.quantized,
            f"no evaluate stage scored {v.origin}: its card will carry no figures",
            f"{', '.join(e.name for e in scored) or 'quantize figures'}",
        )
    p.estimates["repos"] = repos
    p.estimates["files"] = sum(r["files"] for r in repos.values())
    p.estimates["upload_bytes"] = sum(r["bytes"] for r in repos.values())
    # Hard links where the filesystem allows: this much only when it does not.
    p.estimates["disk_bytes"] = p.estimates["upload_bytes"]
    p.estimates["endpoint"] = endpoint
    p.estimates["upload"] = cfg.upload
    p.estimates["token"] = "set" if token else "not set"
    shown = ", ".join(v.name for v in variants)
    p.actions.append(f"build {len(variants)} folders in {cfg.output}: {shown}")
    if cfg.upload:
        for repo, r in repos.items():
            p.actions.append(
                f"upload {r['files']} files ({r['bytes'] / 1e6:.1f} MB) to {endpoint}/{repo}"
                + (" (private)" if cfg.private else "")
            )
    else:
        p.actions.append(
            f"no upload (upload: false); with upload: true the folders would go to {endpoint} "
            f"as {', '.join(repos)}"
        )
    return p


# ---------------------------------------------------------------------------------------------
# apply


def _base_models(cfg: Config, v: layout.Variant, variants: list[layout.Variant]) -> list[str]:
    """Repositories of this publish that the variant was made from (the card's base_model)."""
    if v.kind == "quantized":
        upstream = [v.origin]
    else:
        try:
            manifest = read_manifest(v.origin)
        except ArtifactError:
            return []
        upstream = [Path(i["path"]) for i in manifest.get("inputs", []) if i.get("path")]
    return [
        _repo(cfg, w.name)
        for w in variants
        if w is not v and w.kind == "model" and any(cards._same(w.origin, u) for u in upstream)
    ]


def _build(
    cfg: Config,
    v: layout.Variant,
    folder: Path,
    variants: list[layout.Variant],
    evaluations: list[cards.Evaluation],
) -> list[dict[str, Any]]:
    """Write one folder; returns its files with sha256 and size."""
    from albor.data.bpe import TOKENIZER_CONFIG, hf_config

    folder.mkdir(parents=True)
    for rel, src in v.files.items():
        layout.place(src, folder / rel)
    if v.kind == "model" and not (folder / TOKENIZER_CONFIG).is_file():
        atomic_write_json(folder / TOKENIZER_CONFIG, hf_config())
    scored = cards.evaluations_of(v, evaluations)
    found = [f for e in scored for f in cards.figures(e)] + cards.quantize_figures(v)
    repo = _repo(cfg, v.name)
    model_card = cards.make_card(
        v, repo, found, scored, _base_models(cfg, v, variants), license=cfg.license
    )
    model_card.save(folder / layout.CARD)
    files = layout.describe_files(folder)
    evaluation_inputs = [
        {
            "name": "evaluation",
            "stage": "evaluate",
            "node": e.name,
            "path": str(e.path),
            "digest": e.digest,
        }
        for e in scored
    ]
    atomic_write_json(
        folder / MANIFEST,
        {
            "albor_manifest": 1,
            "stage": NAME,
            "name": v.name,
            "repo_id": repo,
            "library": v.library,
            "digest": outputs_digest(files),
            "inputs": [s.to_json() for s in v.sources] + evaluation_inputs,
            "outputs": files,
        },
    )
    return layout.describe_files(folder)


def apply(cfg: Config, ctx: ApplyContext) -> Outcome:
    assert cfg.output is not None
    problem = layout.output_changes(cfg.output, thorough=True)
    if problem:
        raise ArtifactError(f"{ctx.name}: {problem}")
    inputs = Inputs(
        [layout.read_checkpoint(m) for m in cfg.models],
        layout.read_export(cfg.export) if cfg.export else None,
        layout.read_quantize(cfg.quantize) if cfg.quantize else None,
        layout.read_report(cfg.report) if cfg.report else None,
    )
    variants = inputs.variants()
    evaluations = _evaluated(cfg)
    # The work dir may hold the folders of an attempt whose upload failed: build them afresh.
    for child in ctx.out.iterdir():
        if not child.name.startswith("."):
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    endpoint = resolve_endpoint(cfg.endpoint)
    record: dict[str, dict[str, Any]] = {}
    for v in variants:
        files = _build(cfg, v, ctx.out / v.name, variants, evaluations)
        repo = _repo(cfg, v.name)
        record[v.name] = {
            "repo_id": repo,
            # Without a namespace the server picks it (the token's user) at upload.
            "url": f"{endpoint}/{repo}" if cfg.namespace else None,
            "uploaded": False,
            "private": cfg.private,
            "library": v.library,
            "bytes": sum(f["bytes"] for f in files),
            "files": files,
        }
    atomic_write_json(ctx.out / RECORD, record)
    if cfg.upload:
        _upload(cfg, ctx, endpoint, record)
    uploaded = sum(r["uploaded"] for r in record.values())
    metrics = {
        "endpoint": endpoint,
        "uploaded": uploaded,
        "variants": {
            name: {k: r[k] for k in ("repo_id", "url", "uploaded", "bytes")}
            | {"files": len(r["files"])}
            for name, r in record.items()
        },
    }
    total = sum(r["bytes"] for r in record.values())
    where = f"uploaded to {endpoint}" if cfg.upload else "built (upload: false)"
    summary = f"{len(record)} folders, {total / 1e6:.1f} MB, {where}: " + ", ".join(
        r["repo_id"] for r in record.values()
    )
    sources = [{"name": "evaluation", "path": str(e.path), "digest": e.digest} for e in evaluations]
    return Outcome(summary=summary, metrics=metrics, sources=sources)


def _upload(cfg: Config, ctx: ApplyContext, endpoint: str, record: dict[str, Any]) -> None:
    """Upload every folder in turn, recording each success in publish.json as it happens."""
    token = read_token(cfg.token_env)
    kept = f"the folders are in {ctx.out}"
    if token is None:
        raise StageFailed(
            f"{ctx.name}: no token in ${cfg.token_env}; set it or upload: false; {kept}"
        )
    for done, (name, r) in enumerate(record.items()):
        try:
            result = upload_folder(
                ctx.out / name,
                r["repo_id"],
                endpoint=endpoint,
                token=token,
                private=cfg.private,
                message=f"albor publish: {name}",
            )
        except UploadFailed as e:
            raise StageFailed(
                f"{ctx.name}: {e}; {done} of {len(record)} folders uploaded; {kept}"
            ) from e
        r.update(repo_id=result.repo_id, url=result.url, uploaded=True, commit=result.commit)
        atomic_write_json(ctx.out / RECORD, record)
