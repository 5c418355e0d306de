"""evaluate: measure a checkpoint: perplexity, HumanEval pass@k, HumanEval infilling, custom code
benchmarks, bits per byte of bodies given their docstrings, decode speed, and benchmark
contamination of a corpus. The checkpoint is `model` (any stage that writes one), or with
`variant` a model inside it (a quantize stage's int8 or int4 dir).

Two forms of config:
- flat (what the default pipeline uses): `model`, `data`, `split`, ... score perplexity and bits
  per byte of one split of a tokenize artifact beside a unigram baseline (token frequencies of the
  train split, add-one smoothed, scored on exactly the same targets: a model that has learned
  anything beyond token frequencies is clearly below it). metrics.json holds those figures.
- `tasks:`, a list of tasks, each `{task: TYPE, ...}` with its own keys (`albor evaluate keys`
  and the classes below): `perplexity` (token shards of `data`, or `text:` files),
  `humaneval`, `custom` (a JSONL benchmark: prompt, test, entry_point), `humaneval-infill`,
  `pairs` (bits per byte of each body given its signature and docstring, on a split of the
  `pairs` artifact), `speed` (decode ms/token and time to first token on this machine),
  `contamination` (n-gram overlap of a corpus with benchmarks). metrics.json
  maps each task's `name` (default: its type) to its metrics, and each task writes its JSONL
  files beside it: NAME.completions.jsonl + NAME.results.jsonl (humaneval, custom), NAME.jsonl
  (infill, contamination).

Each task type is a module of `albor.evals.tasks` (its keys, plan and run); this module parses
the task list, plans and runs the tasks in turn and writes metrics.json. Generated code only
ever runs in `albor.evals.sandbox`. `plan` counts the generations and sandbox runs each task
will make and estimates their time.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from albor.artifact import artifact_digest, atomic_write_json, sha256_tree
from albor.config import Int
from albor.device import resolve as resolve_device
from albor.errors import AlborError, ConfigError
from albor.evals import benchmarks as bench
from albor.evals.tasks import (
    Inputs,
    Models,
    Planning,
    Split,
    code,
    contamination,
    pairs,
    perplexity,
    speed,
)
from albor.evals.tasks.code import CustomTask, HumanEvalTask, InfillTask
from albor.evals.tasks.contamination import ContaminationTask
from albor.evals.tasks.pairs import PairsTask
from albor.evals.tasks.perplexity import PerplexityTask
from albor.evals.tasks.speed import SpeedTask
from albor.plan import Plan
from albor.stage import ApplyContext, Outcome, OutputConfig, PlanContext, check_input

NAME = "evaluate"
INPUTS = ("model", "data", "pairs")

Task = Annotated[
    PerplexityTask
    | HumanEvalTask
    | CustomTask
    | InfillTask
    | ContaminationTask
    | PairsTask
    | SpeedTask,
    Field(discriminator="task"),
]
# The module that plans and runs each task type.
MODULES: dict[str, ModuleType] = {
    "perplexity": perplexity,
    "humaneval": code,
    "custom": code,
    "humaneval-infill": code,
    "contamination": contamination,
    "pairs": pairs,
    "speed": speed,
}
MODEL_TASKS = ("perplexity", "humaneval", "custom", "humaneval-infill", "pairs", "speed")
# Tasks whose estimates add up to the plan's totals of generations, sandbox runs and time.
COSTED_TASKS = ("humaneval", "custom", "humaneval-infill", "contamination")


class Config(OutputConfig):
    model: Path | None = Field(
        None,
        description="Checkpoint directory (the output of pretrain, distill, finetune, merge, "
        "prune), or a quantize artifact with `variant`.",
    )
    variant: str | None = Field(
        None,
        description="A model inside the `model` artifact: a quantize stage's `int8` or `int4` "
        "dir (its GGUF files are measured by the quantize stage itself).",
    )
    data: Path | None = Field(None, description="Token shard artifact directory (tokenize output).")
    pairs: Path | None = Field(
        None, description="Pairs artifact directory (pairs output), for `pairs` tasks."
    )
    split: Split = Field("val", description="Split to score (flat form).")
    max_tokens: Int = Field(262144, gt=0, description="Most target tokens scored (flat form).")
    seq_len: Int | None = Field(None, gt=0, description="Window length; default: the context.")
    batch_size: Int = Field(8, gt=0, description="Windows per forward pass (flat form).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda if available.")
    tasks: list[Task] | None = Field(
        None,
        description="Tasks to run, each {task: perplexity|humaneval|custom|humaneval-infill|"
        "pairs|speed|contamination, ...}; unset: perplexity of `split` (the flat form).",
    )
    workers: Int | None = Field(
        None, gt=0, description="Sandboxed runs at a time; default: the number of cores."
    )
    generation_only: bool = Field(
        False,
        description="Every humaneval and custom task writes its completions and stops (score "
        "them later with `albor eval execute FILE`); `--generation-only` on the command line.",
    )

    @model_validator(mode="after")
    def _generation_only(self) -> Config:
        if self.generation_only:
            generating = [t for t in self.tasks or [] if isinstance(t, HumanEvalTask | CustomTask)]
            if not generating:
                raise ValueError(
                    "generation_only: no humaneval or custom task to generate for: add one "
                    "to `tasks` or drop generation_only"
                )
            tasks = [
                t.model_copy(update={"generation_only": True}) if t in generating else t
                for t in self.tasks or []
            ]
            object.__setattr__(self, "tasks", tasks)  # assignment would validate again, forever
        return self

    @model_validator(mode="after")
    def _variant(self) -> Config:
        v = self.variant
        if v is not None and (not v or v in (".", "..") or "/" in v or "\\" in v):
            raise ValueError(
                f"variant {v!r}: name one directory inside the `model` artifact, e.g. int8"
            )
        return self

    def model_dir(self) -> Path | None:
        """The checkpoint the model tasks read: `model`, or its `variant` inside it."""
        if self.model is None or self.variant is None:
            return self.model
        return self.model / self.variant

    @model_validator(mode="after")
    def _distinct_names(self) -> Config:
        seen: set[str] = set()
        for i, t in enumerate(self.tasks or []):
            name = task_name(t)
            if name in seen:
                raise ValueError(
                    f"tasks[{i}]: name '{name}' is used twice; give each task a distinct `name`"
                )
            seen.add(name)
        return self

    def task_list(self) -> list[Any]:
        """The tasks; the flat form is one perplexity task."""
        if self.tasks is not None:
            return list(self.tasks)
        return [
            PerplexityTask(
                task="perplexity",
                split=self.split,
                max_tokens=self.max_tokens,
                seq_len=self.seq_len,
                batch_size=self.batch_size,
            )
        ]


def task_name(t: Any) -> str:
    return str(t.name or t.task)


def source_state(cfg: Config) -> dict[str, str] | None:
    """Digests of what tasks read beside the inputs (`model`, `data`, `pairs`), so that a
    changed benchmark or corpus re-runs the stage."""
    if cfg.tasks is None:
        return None
    state: dict[str, str] = {}
    for t in cfg.tasks:
        name = task_name(t)
        try:
            if isinstance(t, PerplexityTask) and t.text is not None:
                state[name] = sha256_tree(t.text)
            elif isinstance(t, HumanEvalTask | InfillTask):
                state[name] = bench.state(bench.BenchmarkConfig(name=bench.HUMANEVAL))
            elif isinstance(t, CustomTask):
                state[name] = sha256_tree(t.path)
            elif isinstance(t, ContaminationTask):
                corpus = artifact_digest(t.corpus)
                state[name] = corpus + "/" + "/".join(bench.state(b) for b in t.benchmarks)
        except (OSError, AlborError):
            state[name] = "unreadable"
    return state


# ----- plan ----------------------------------------------------------------------------------


def inputs(cfg: Config) -> Inputs:
    return Inputs(cfg.model_dir(), cfg.data, cfg.pairs, cfg.device, cfg.workers, cfg.tasks is None)


def plan(cfg: Config, ctx: PlanContext | None = None) -> Plan:
    from albor.model.estimate import param_count
    from albor.model.hf import load_config

    ctx = ctx or PlanContext()
    p = Plan(NAME)
    tasks = cfg.task_list()
    mc = None
    device = "cpu"
    if any(t.task in MODEL_TASKS for t in tasks):
        model = cfg.model_dir()
        mc = check_input(p, ctx, "model", model, load_config, "a checkpoint directory")
        if mc is not None:
            p.add("model", "ok", f"{model}: {param_count(mc):,} parameters")
        try:
            device = resolve_device(cfg.device)
            p.add("device", "ok", f"{cfg.device}: runs on {device}")
        except ConfigError as e:
            p.add("device", "fail", str(e))
    planning = Planning(p, ctx, inputs(cfg), mc, device)
    totals = {"generations": 0, "sandbox_runs": 0, "est_seconds": 0.0}
    for t in tasks:
        name = task_name(t)
        est = MODULES[t.task].plan(t, planning, name)
        if est:
            p.estimates[name] = est
            for key in totals:
                totals[key] += est.get(key, 0)
    if any(t.task in COSTED_TASKS for t in tasks):
        p.estimates.update(
            {k: round(v, 1) if isinstance(v, float) else v for k, v in totals.items()}
        )
    p.actions.append(
        f"run {', '.join(task_name(t) for t in tasks)}; write metrics.json to {cfg.output}"
    )
    return p


# ----- apply ---------------------------------------------------------------------------------


def apply(cfg: Config, ctx: ApplyContext) -> Outcome:
    models = Models(inputs(cfg))
    if cfg.tasks is None:
        metrics, summary = perplexity.run(cfg.task_list()[0], models, "perplexity", ctx.out)
        atomic_write_json(ctx.out / "metrics.json", metrics)
        return Outcome(summary=summary, metrics=metrics)
    all_metrics: dict[str, Any] = {}
    summaries = []
    for t in cfg.tasks:
        name = task_name(t)
        metrics, summary = MODULES[t.task].run(t, models, name, ctx.out)
        all_metrics[name] = metrics
        summaries.append(f"{name}: {summary}")
    atomic_write_json(ctx.out / "metrics.json", all_metrics)
    return Outcome(summary="; ".join(summaries), metrics=all_metrics)
