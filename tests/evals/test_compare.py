"""`albor eval compare` over every kind of variant: evaluate, quantize (full model and each
variant), prune (before and after), finetune (base and tuned), pretrain and distill artifacts
made by the real stages on a tiny model, their figures read back from the manifests, and the
best value marked only among columns scored on the same windows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from albor.data.bpe import EOS, TOKENIZER_FILES, load_tokenizer
from albor.errors import ArtifactError, ConfigError
from albor.evals.compare import Comparison, compare, table
from albor.model.gpt import GPT
from albor.model.hf import save_pretrained
from albor.model.presets import preset
from albor.stage import run_stage
from albor.stages import distill, evaluate, finetune, pretrain, prune, quantize
from helpers import (
    STDLIB_SAMPLE,
    mine_pairs,
    pretrain_config,
    run,
    stdlib_texts,
)

# prune and quantize score the same first val windows: their bits/byte compare.
SCORED = {"eval_tokens": 1024, "seq_len": 64}


def _manifest(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "manifest.json").read_text())


@pytest.fixture(scope="module")
def artifacts(token_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random tiny model in `token_data`'s tokenizer, and its evaluate, quantize (int8),
    prune (magnitude, 50%) and finetune (a few LoRA steps) artifacts."""
    root = tmp_path_factory.mktemp("compare")
    model = root / "model"
    torch.manual_seed(0)
    cfg = preset("tiny")
    save_pretrained(GPT(cfg), cfg, model, eos_token_id=load_tokenizer(token_data).token_to_id(EOS))
    for name in TOKENIZER_FILES:
        shutil.copyfile(token_data / name, model / name)

    ev = evaluate.Config(model=model, data=token_data, output=root / "evaluate", max_tokens=256)
    q = quantize.Config.model_validate(
        {
            "model": model,
            "data": token_data,
            "output": root / "quantize",
            "variants": ["int8"],
            "threads": 1,
            "bench_prompt_tokens": 16,
            "bench_new_tokens": 4,
            "bench_repeats": 1,
            **SCORED,
        }
    )
    p = prune.Config.model_validate(
        {"model": model, "data": token_data, "output": root / "prune", "sparsity": 0.5, **SCORED}
    )
    _, pairs_data = mine_pairs(root, stdlib_texts(STDLIB_SAMPLE))
    f = finetune.Config.model_validate(
        {
            "base": model,
            "data": pairs_data,
            "output": root / "finetune",
            "seq_len": 128,
            "micro_batch": 4,
            "max_steps": 6,
            "warmup_steps": 1,
            "lr": 1e-2,
            "eval_every": 6,
            "eval_tokens": 512,
            "checkpoint_every": 6,
            "threads": 1,
            "device": "cpu",
        }
    )
    out = {"model": model}
    for name, module, config in (
        ("evaluate", evaluate, ev),
        ("quantize", quantize, q),
        ("prune", prune, p),
        ("finetune", finetune, f),
    ):
        out[name] = run_stage(module, config).output
    return out


def test_every_variant_from_its_manifest(artifacts: dict[str, Path]) -> None:
    dirs = [artifacts[k] for k in ("evaluate", "quantize", "prune", "finetune")]
    c = compare(dirs)
    assert [(r["stage"], r["variant"]) for r in c.rows] == [
        ("evaluate", None),
        ("quantize", "full"),
        ("quantize", "int8"),
        ("prune", "before"),
        ("prune", "after"),
        ("finetune", "base"),
        ("finetune", "tuned"),
    ]
    ev, full, int8, before, after, base, tuned = c.rows
    q = _manifest(artifacts["quantize"])["metrics"]["variants"]
    for row, name in ((full, "full"), (int8, "int8")):
        for key in ("val_bpb", "kl_mean", "top1_agreement", "bytes_disk", "decode_ms_per_token"):
            assert row["metrics"][key] == q[name][key]
    assert "parity.top1_agreement" not in c.columns and "bits" not in c.columns
    pm = _manifest(artifacts["prune"])["metrics"]
    assert before["metrics"] == {
        "val_bpb": pm["val_bpb_before"],
        "parameters": pm["parameters"]["before"],
    }
    assert after["metrics"]["val_bpb"] == pm["val_bpb_after"]
    assert after["metrics"]["sparsity"] == pm["sparsity"] == pytest.approx(0.5, abs=1e-3)
    fm = _manifest(artifacts["finetune"])["metrics"]
    assert base["metrics"] == {"val_loss": fm["base_val_loss"], "val_bpb": fm["base_val_bpb"]}
    assert tuned["metrics"] == {"val_loss": fm["val_loss"], "val_bpb": fm["val_bpb"]}
    assert (
        ev["metrics"]["perplexity.bits_per_byte"]
        == (_manifest(artifacts["evaluate"])["metrics"]["bits_per_byte"])
    )
    # Two stages, one model, the same windows: the same bits/byte (prune rounds to 5 places).
    assert before["scored_on"] == full["scored_on"]
    assert before["metrics"]["val_bpb"] == pytest.approx(full["metrics"]["val_bpb"], abs=1e-5)
    assert full["model"] == before["model"] == str(artifacts["model"])
    assert int8["model"] == str(artifacts["quantize"] / "int8")


def test_best_is_marked_within_each_group_scored_alike(artifacts: dict[str, Path]) -> None:
    c = compare([artifacts[k] for k in ("quantize", "prune", "finetune")])
    best = c.best()
    bpb = [r["metrics"]["val_bpb"] for r in c.rows]
    # The val split's four columns, and finetune's completion bytes, each their own best.
    val_split, completions = bpb[:4], bpb[4:]
    assert best["val_bpb"] == sorted(
        [i for i, v in enumerate(val_split) if v == min(val_split)]
        + [4 + i for i, v in enumerate(completions) if v == min(completions)]
    )
    assert len(best["val_bpb"]) >= 2 and best["val_bpb"][-1] >= 4
    assert best["kl_mean"][0] == 0  # the full model is at zero KL from itself
    # Agreeing with itself, the full model is best; int8 may agree everywhere too (a tie).
    assert best["top1_agreement"] == [0] + [1] * (c.rows[1]["metrics"]["top1_agreement"] == 1)
    assert best["bytes_disk"] == [1]  # int8 is smaller than fp32
    assert "sparsity" not in best and "parameters" not in best  # no better direction
    labels = c.to_json()["best"]
    assert labels["bytes_disk"] == [f"{artifacts['quantize']}:int8"]


def test_groups_with_one_value_are_not_marked() -> None:
    rows = [
        {"label": "a", "scored_on": {"data": "x"}, "metrics": {"val_bpb": 1.0, "kl_mean": 0.5}},
        {"label": "b", "scored_on": {"data": "y"}, "metrics": {"val_bpb": 2.0, "kl_mean": 0.1}},
        {"label": "c", "scored_on": {"data": "y"}, "metrics": {"val_bpb": 3.0}},
    ]
    best = Comparison(["val_bpb", "kl_mean"], rows).best()
    # a's 1.0 is alone on its windows: it beats nothing it can be compared with.
    assert best == {"val_bpb": [1]}


def test_cli_table_and_json(artifacts: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    dirs = [str(artifacts[k]) for k in ("evaluate", "quantize", "prune", "finetune")]
    code, stdout, stderr = run(["eval", "compare", *dirs, "--json"], capsys)
    assert code == 0, stderr
    got = json.loads(stdout)
    assert len(got["rows"]) == 7
    assert got["best"]["kl_mean"][0] == f"{artifacts['quantize']}:full"
    code, stdout, stderr = run(["eval", "compare", *dirs], capsys)
    assert code == 0, stderr
    for text in ("int8", "before", "after", "base", "tuned"):
        assert text in stdout
    # The rendered table: a row per metric with its direction, the best values in bold.
    t = table(compare([Path(d) for d in dirs]))
    metrics = list(t.columns[0]._cells)
    wanted = {"val_bpb ↓", "top1_agreement ↑", "sparsity", "perplexity.bits_per_byte ↓"}
    assert wanted <= set(metrics)
    bytes_row = [str(col._cells[metrics.index("bytes_disk ↓")]) for col in t.columns[1:]]
    assert [cell.startswith("[bold") for cell in bytes_row] == [0, 0, 1, 0, 0, 0, 0]
    code, stdout, _ = run(["eval", "compare", dirs[1], "--metric", "bits", "--json"], capsys)
    assert code == 0 and json.loads(stdout)["columns"] == ["bits"]
    assert [r["metrics"] for r in json.loads(stdout)["rows"]] == [{}, {"bits": 8}]


def test_what_it_cannot_read(
    artifacts: dict[str, Path], token_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ArtifactError, match="stage 'tokenize'; compare reads the outputs of"):
        compare([artifacts["prune"], token_data])
    with pytest.raises(ConfigError, match="no metric matches nothing"):
        compare([artifacts["prune"]], ["nothing.*"])
    with pytest.raises(ConfigError, match="at least one artifact"):
        compare([])
    code, _, stderr = run(["eval", "compare", str(token_data)], capsys)
    assert code == 1 and "tokenize" in stderr
    assert table(compare([artifacts["prune"]])).row_count == 3  # val_bpb, parameters, sparsity


def test_a_distilled_student_beside_its_base(
    token_data: Path, trained_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """pretrain and distill artifacts give a column each, scored on the same val windows, so the
    student's bits/byte is compared with the base's and the best marked."""
    short = {"max_steps": 6, "eval_every": 6, "checkpoint_every": 6, "threads": 1}
    base = run_stage(pretrain, pretrain_config(token_data, tmp_path / "base", **short)).output
    cfg = pretrain_config(token_data, tmp_path / "distill", **short).model_dump(
        mode="json", exclude_none=True
    )
    student = run_stage(
        distill, distill.Config.model_validate({**cfg, "teacher": trained_model})
    ).output
    c = compare([base, student])
    assert [(r["stage"], r["variant"]) for r in c.rows] == [("pretrain", None), ("distill", None)]
    for row, directory in zip(c.rows, (base, student), strict=True):
        m = _manifest(directory)["metrics"]
        assert row["metrics"] == {k: m[k] for k in ("val_loss", "val_bpb", "parameters")}
        assert row["model"] == str(directory)
    assert c.rows[0]["scored_on"] == c.rows[1]["scored_on"]  # same data, tokens, windows
    bpb = [r["metrics"]["val_bpb"] for r in c.rows]
    assert c.best()["val_bpb"] == [i for i, v in enumerate(bpb) if v == min(bpb)]
    code, stdout, stderr = run(["eval", "compare", str(base), str(student)], capsys)
    assert code == 0, stderr
    assert "base" in stdout and "distill" in stdout
