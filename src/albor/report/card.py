"""The Markdown model card of the ladder's final model (`model-card.md`), and `card_data`: its
evaluation results as plain data, from which the publish stage builds huggingface_hub's
`ModelCardData` (`EvalResult(**row)` for each row of `eval_results`).
"""

from __future__ import annotations

from typing import Any

from albor.report.collect import Report, Variant
from albor.report.page import fmt, human_bytes, human_count
from albor.report.plots import Drawn

# (Variant field, task type, dataset name, metric type, metric name) for the Hub's model-index.
EVAL_FIELDS = (
    ("val_bpb", "text-generation", "validation split", "bits_per_byte", "val bits/byte"),
    ("pairs_bpb", "text-generation", "docstring -> body pairs", "bits_per_byte", "pairs bits/byte"),
    ("pass_at_1", "text-generation", "openai_humaneval", "pass@1", "HumanEval pass@1"),
    (
        "infill_em",
        "text-generation",
        "openai_humaneval (single-line infilling)",
        "exact_match",
        "infill exact match",
    ),
)


def _md(text: Any) -> str:
    """A value safe inside a Markdown table cell: no pipes, no newlines, no raw HTML."""
    s = str(text).replace("|", "\\|").replace("\n", " ")
    return s.replace("<", "&lt;").replace(">", "&gt;")


def final_variant(report: Report) -> Variant | None:
    """The evaluated variant of the ladder's final model (else the best one)."""
    for v in report.variants:
        if report.final_model and v.model_stage == report.final_model:
            return v
    return report.best_variant()


def card_data(report: Report) -> dict[str, Any]:
    """The card's metadata: model name, and one eval result per measured figure of the final
    model, with the keys of huggingface_hub's `EvalResult`."""
    v = final_variant(report)
    results = []
    if v is not None:
        for key, task, dataset, metric, name in EVAL_FIELDS:
            value = getattr(v, key)
            if value is not None:
                results.append(
                    {
                        "task_type": task,
                        "dataset_type": dataset.split(" ")[0],
                        "dataset_name": dataset,
                        "metric_type": metric,
                        "metric_name": name,
                        "metric_value": value,
                    }
                )
    return {
        "model_name": f"{report.name}-{report.final_model or (v.name if v else 'model')}",
        "final_stage": report.final_model,
        "variant": v.name if v else None,
        "parameters": v.parameters if v else None,
        "eval_results": results,
        "tags": ["albor", "code", "python", "text-generation"],
        "library_name": "transformers",
    }


def render_card(report: Report, drawn: list[Drawn]) -> str:
    v = final_variant(report)
    name = report.final_model or (v.name if v else "model")
    lines = [f"# {_md(report.name)}: {_md(name)}", ""]
    lines += [
        "A small Python code-completion model built end to end by albor: ingested and cleaned "
        "source, a BPE tokenizer, pretraining, distillation, instruction finetuning, merging, "
        "pruning and quantization, each stage an artifact with a manifest.",
        "",
    ]
    if report.description:
        lines += [_md(report.description), ""]
    if v is not None:
        lines += [
            f"- variant: **{_md(v.name)}** (stage `{_md(v.model_stage or '?')}`)",
            f"- parameters: {human_count(v.parameters)}; weights on disk: "
            f"{human_bytes(v.size_bytes)}",
            "",
        ]
    lines += ["## How it was made", ""]
    lines += [
        f"{i + 1}. `{_md(s.name)}` ({_md(s.kind or '?')}): {_md(s.status)}"
        + (f": {_md(s.detail)}" if s.detail else "")
        for i, s in enumerate(report.stages)
    ]
    lines.append("")
    for d in drawn:
        if d.file is not None:
            lines += [f"![{_md(d.title)}]({d.file})", ""]
    lines += ["## Evaluation", ""]
    if report.variants:
        lines += [
            "| variant | val bits/byte | pairs bits/byte | HumanEval pass@1 | infill exact "
            "match | decode ms/token | parameters | weights |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {_md(x.name)} | {fmt(x.val_bpb)} | {fmt(x.pairs_bpb)} | {fmt(x.pass_at_1)} | "
            f"{fmt(x.infill_em)} | {fmt(x.decode_ms, 2)} | {human_count(x.parameters)} | "
            f"{human_bytes(x.size_bytes)} |"
            for x in report.variants
        ]
    else:
        lines.append("No evaluate stage has run.")
    if report.quantize:
        lines += [
            "",
            f"Quantized files (stage `{_md(report.quantize_stage)}`):",
            "",
            "| variant | val bits/byte | KL mean | top-1 | decode ms/token | size |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {_md(q.name)} | {fmt(q.val_bpb, 4)} | {fmt(q.kl_mean, 5)} | {fmt(q.top1)} | "
            f"{fmt(q.decode_ms, 3)} | {human_bytes(q.bytes_disk)} |"
            for q in report.quantize
        ]
    lines += ["", "## Falsification contracts", ""]
    if report.contracts is None:
        lines.append(_md(report.contracts_note))
    else:
        lines += ["| id | title | status | figure |", "|---|---|---|---|"]
        lines += [
            f"| {_md(c.id)} | {_md(c.title)} | {_md(c.status)} | {_md(c.figure)} |"
            for c in report.contracts
        ]
    lines += [
        "",
        "## Limitations",
        "",
        "- A toy-size model trained on one small corpus (by default the Python standard "
        "library): it completes Python in that style and is not a general assistant.",
        "- Its HumanEval figures are small-sample and greedy; bits/byte figures are on the "
        "ladder's own validation split, so they compare variants of this ladder, not other "
        "models.",
        "- Generated code is unreviewed: run it only where a mistake is cheap.",
    ]
    if report.problems:
        lines.append(
            "- This card was written while stages were missing or failed: "
            + ", ".join(f"`{_md(s.name)}` ({_md(s.status)})" for s in report.problems)
            + "."
        )
    lines += ["", "## Provenance", "", "| stage | kind | sha256 of the artifact |", "|---|---|---|"]
    lines += [f"| {_md(p.name)} | {_md(p.kind)} | `{_md(p.digest)}` |" for p in report.provenance]
    return "\n".join(lines) + "\n"
