"""The model card of a published folder: huggingface_hub's `ModelCard` with a `ModelCardData`
header whose `model-index` holds the variant's evaluation results, and a body with the same
figures as tables, how to load the files, their provenance and the report's plots.

The figures are those of the workdir's evaluate stages that scored the variant (an evaluate
artifact beside the inputs whose `model` is the variant's checkpoint; for the quantized folder,
the ones that scored its int8 / int4 directories, and quantize's own measurements of every
variant). A variant nothing evaluated gets a card that says so.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from albor.artifact import MANIFEST, artifact_digest, read_manifest
from albor.errors import ArtifactError

if TYPE_CHECKING:
    from huggingface_hub import EvalResult, ModelCard

    from albor.publish.layout import Variant

METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class Evaluation:
    """One evaluate artifact: where it is, what it scored, its figures."""

    path: Path
    name: str
    model: Path
    variant: str | None  # a model inside `model` (quantize's int8 / int4)
    tasks: dict[str, str]  # metrics key -> task type
    metrics: dict[str, Any]
    digest: str


@dataclass(frozen=True)
class Figure:
    """One number of an evaluation, as the card's table and its model-index show it."""

    task: str
    dataset_type: str
    dataset_name: str
    split: str | None
    metric_type: str
    metric_name: str
    value: float
    evaluation: str  # the evaluate stage it comes from
    variant: str | None = None


def _same(a: Path, b: Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b) or (
        a.exists() and b.exists() and a.resolve() == b.resolve()
    )


def find_evaluations(roots: list[Path]) -> list[Evaluation]:
    """Every finished evaluate artifact directly under the given directories (the workdir the
    inputs live in), in name order. One that cannot be read is passed by: the card of the
    variant it scored says no evaluation was found."""
    found: dict[str, Evaluation] = {}
    for root in roots:
        if not root.is_dir():
            continue
        for d in sorted(root.iterdir()):
            if d.name.startswith(".") or not (d / MANIFEST).is_file():
                continue
            try:
                manifest = read_manifest(d)
            except ArtifactError:
                continue
            if manifest.get("stage") != "evaluate":
                continue
            metrics_path = d / METRICS_FILE
            try:
                metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                metrics = manifest.get("metrics") or {}
            config = manifest.get("config") or {}
            tasks = {
                str(t.get("name") or t.get("task")): str(t.get("task"))
                for t in config.get("tasks") or []
                if isinstance(t, dict)
            }
            found[str(d.resolve())] = Evaluation(
                d,
                str(manifest.get("name", d.name)),
                Path(config.get("model") or ""),
                config.get("variant"),
                tasks,
                metrics if isinstance(metrics, dict) else {},
                artifact_digest(d),
            )
    return sorted(found.values(), key=lambda e: e.name)


def evaluations_of(variant: Variant, evaluations: list[Evaluation]) -> list[Evaluation]:
    """The evaluations that scored this variant's files."""
    if variant.kind == "model":
        return [e for e in evaluations if e.variant is None and _same(e.model, variant.origin)]
    quantize = next((s.path for s in variant.sources if s.role == "quantize"), None)
    if quantize is None:
        return []
    return [e for e in evaluations if e.variant is not None and _same(e.model, quantize)]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def figures(evaluation: Evaluation) -> list[Figure]:
    """The figures of one evaluation, task by task (evaluate's metrics.json layout: task name ->
    metrics; the flat form's perplexity figures at the top level)."""
    metrics = evaluation.metrics
    if "bits_per_byte" in metrics:  # the flat form: one perplexity task
        metrics = {"perplexity": metrics}
    found: list[Figure] = []

    def add(task: str, dtype: str, dname: str, split: Any, mtype: str, mname: str, v: Any) -> None:
        value = _number(v)
        if value is not None:
            found.append(
                Figure(
                    task,
                    dtype,
                    dname,
                    str(split) if split else None,
                    mtype,
                    mname,
                    round(value, 6),
                    evaluation.name,
                    evaluation.variant,
                )
            )

    for key, m in metrics.items():
        if not isinstance(m, dict):
            continue
        kind = evaluation.tasks.get(key, key)
        if kind == "perplexity":
            split = m.get("split", "val")
            add(
                key,
                "albor-corpus",
                f"corpus, {split} split",
                split,
                "bits_per_byte",
                "bits per byte",
                m.get("bits_per_byte"),
            )
        elif kind == "pairs":
            split = m.get("split", "val")
            add(
                key,
                "albor-pairs",
                f"docstring -> body pairs, {split} split",
                split,
                "bits_per_byte",
                "bits per byte of the body",
                m.get("bits_per_byte"),
            )
        elif kind in ("humaneval", "custom"):
            dtype, dname = ("openai_humaneval", "HumanEval") if kind == "humaneval" else (key, key)
            problems = m.get("problems")
            shown = f"{dname} ({problems} problems)" if problems else dname
            for metric, value in m.items():
                if metric.startswith("pass@"):
                    add(key, dtype, shown, "test", metric, metric, value)
        elif kind == "humaneval-infill":
            for infill_kind, modes in m.items():
                if not isinstance(modes, dict):
                    continue
                for mode, scores in modes.items():
                    if isinstance(scores, dict):
                        add(
                            key,
                            "loubnabnl/humaneval_infilling",
                            f"HumanEval infilling, {infill_kind} ({mode})",
                            "test",
                            "exact_match",
                            "exact match",
                            scores.get("exact_match"),
                        )
        elif kind == "speed":
            add(
                key,
                "albor-speed",
                f"decode on {m.get('device', 'cpu')}",
                None,
                "decode_ms_per_token",
                "decode ms/token",
                m.get("decode_ms_per_token"),
            )
    return found


def quantize_figures(variant: Variant) -> list[Figure]:
    """Quantize's own measurement of each lower-precision form: val bits/byte on the same
    windows as the full model (the figure that says what the precision cost)."""
    node = next((s.name for s in variant.sources if s.role == "quantize"), "quantize")
    found = []
    for name, row in variant.quantized.items():
        value = _number(row.get("val_bpb"))
        if name == "full" or value is None:
            continue
        found.append(
            Figure(
                "quantize",
                "albor-corpus",
                "corpus, val split",
                "val",
                "bits_per_byte",
                "bits per byte, as quantize measured it",
                round(value, 6),
                node,
                name,
            )
        )
    return found


def eval_results(found: list[Figure]) -> list[EvalResult]:
    """The figures as huggingface_hub `EvalResult`s (the card's model-index); decode speed is a
    property of the machine, not of a dataset, and stays in the card's body."""
    from huggingface_hub import EvalResult

    results = []
    for f in found:
        if f.task == "speed" or f.metric_type == "decode_ms_per_token":
            continue
        name = f.metric_name + (f" ({f.variant})" if f.variant else "")
        results.append(
            EvalResult(
                task_type="text-generation",
                task_name="Code generation",
                dataset_type=f.dataset_type,
                dataset_name=f.dataset_name,
                dataset_split=f.split,
                metric_type=f.metric_type,
                metric_name=name,
                metric_value=f.value,
            )
        )
    return results


# ---------------------------------------------------------------------------------------------
# the card


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _fmt(value: Any, digits: int = 4) -> str:
    number = _number(value)
    if number is None:
        return "-"
    return f"{number:.{digits}f}".rstrip("0").rstrip(".") if number % 1 else str(int(number))


_STAGE_WORDS = {
    "pretrain": "pretrained from scratch",
    "distill": "distilled from a larger teacher's next-token distributions",
    "finetune": "LoRA-finetuned on docstring -> body pairs (adapter merged)",
    "merge": "merged from checkpoints of one architecture",
    "prune": "pruned to exact sparsity",
    "export": "exported",
    "quantize": "quantized",
}


def make_card(
    variant: Variant,
    repo: str,
    found: list[Figure],
    evaluations: list[Evaluation],
    base_models: list[str],
    license: str = "apache-2.0",
) -> ModelCard:
    """The card of one folder: metadata (model-index with `found`) and a body."""
    from huggingface_hub import ModelCard, ModelCardData

    tags = ["albor", "code", "python", variant.stage]
    if variant.kind == "quantized" or variant.ggufs:
        tags.append("gguf")
    data = ModelCardData(
        model_name=repo,
        language="code",
        license=license,
        library_name=variant.library,
        pipeline_tag="text-generation",
        tags=tags,
        base_model=(base_models[0] if len(base_models) == 1 else base_models) or None,
        eval_results=eval_results(found) or None,
    )
    body = _body(variant, repo, found, evaluations)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _body(variant: Variant, repo: str, found: list[Figure], evaluations: list[Evaluation]) -> str:
    parts = [f"# {repo}", ""]
    params = variant.metrics.get("parameters")
    what = _STAGE_WORDS.get(variant.stage, variant.stage)
    if variant.kind == "quantized":
        parts.append(
            f"Lower-precision forms of the `{variant.origin.name}` checkpoint of albor's ladder "
            "(a small decoder-only Python code model): GGUF files for llama.cpp and int8 / int4 "
            "directories for albor's own engine."
        )
    else:
        size = f"{params:,}-parameter " if isinstance(params, int) else ""
        parts.append(
            f"`{variant.name}`: a {size}decoder-only Python code model of albor's ladder, "
            f"{what} (stage `{variant.stage}`). It loads with transformers' "
            "`AutoModelForCausalLM` and `AutoTokenizer`"
            + (f"; {', '.join(variant.ggufs)} with llama.cpp." if variant.ggufs else ".")
        )
    parts += ["", "## Evaluation", ""]
    found = [f for f in found if f.task != "quantize"]  # the quantized variants' table has them
    if found:
        rows = [
            [
                f.task + (f" ({f.variant})" if f.variant else ""),
                f.dataset_name,
                f.metric_name,
                _fmt(f.value),
                f"`{f.evaluation}`",
            ]
            for f in found
        ]
        parts.append(_table(["task", "data", "metric", "value", "stage"], rows))
        parts.append("")
        parts.append(
            "Bits per byte: lower is better. pass@1 and exact match are greedy, in a sandbox. "
            "Decode speed is of this build machine's CPU."
        )
    else:
        parts.append(
            "No evaluate stage of the workdir scored this model"
            + (
                ", beyond quantize's figures below."
                if variant.quantized
                else ", so no figures "
                "are given here (run the ladder's `eval-*` stages, then publish again)."
            )
        )
    if variant.quantized:
        parts += ["", "## Quantized variants", ""]
        rows = []
        for name, row in variant.quantized.items():
            mb = _number(row.get("bytes_disk"))
            rows.append(
                [
                    name,
                    f"`{row.get('path', '')}`" if name != "full" else "(the source checkpoint)",
                    f"{mb / 1e6:.2f}" if mb is not None else "-",
                    _fmt(row.get("val_bpb")),
                    _fmt(row.get("kl_mean"), 6),
                    _fmt(row.get("top1_agreement")),
                    _fmt(row.get("decode_ms_per_token"), 2),
                ]
            )
        parts.append(
            _table(
                [
                    "variant",
                    "file",
                    "MB",
                    "val bits/byte",
                    "KL to full",
                    "top-1 agreement",
                    "ms/token",
                ],
                rows,
            )
        )
    parts += ["", "## Use", "", "```python"]
    if variant.kind == "model":
        parts += [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
            'ids = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids',
            "print(tokenizer.decode(model.generate(ids, max_new_tokens=64)[0]))",
        ]
    else:
        gguf = variant.ggufs[0] if variant.ggufs else "model.gguf"
        parts += [
            "from llama_cpp import Llama",
            "",
            f'llm = Llama.from_pretrained("{repo}", filename="{gguf}")',
            'print(llm("def fibonacci(n):", max_tokens=64)["choices"][0]["text"])',
        ]
    parts += ["```", "", "## Provenance", ""]
    rows = [[s.role, f"`{s.name}`", s.stage, f"`{s.digest[:16]}`"] for s in variant.sources]
    rows += [["evaluation", f"`{e.name}`", "evaluate", f"`{e.digest[:16]}`"] for e in evaluations]
    parts.append(_table(["input", "stage node", "stage", "artifact digest"], rows))
    parts.append("")
    parts.append(f"`{MANIFEST}` lists every file of this folder with its sha256.")
    if variant.images:
        parts += ["", "## Plots", ""]
        for rel in variant.images:
            parts += [f"![{Path(rel).stem}]({rel})", ""]
    parts.append("")
    return "\n".join(parts)
