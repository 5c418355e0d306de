"""`albor finetune plan` on bad input, as a user meets it: each mistake is refused at plan time
with exit 1 (a failed check) or 2 (a config error), a message that names the key or file and
the fix, and no traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from helpers import STDLIB_SAMPLE, mine_pairs, run, stdlib_texts


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("finetune_cli")
    splits, found = mine_pairs(root, stdlib_texts(STDLIB_SAMPLE[:4]), val=0, test=0)
    return {"split": splits, "pairs": found}


@pytest.mark.parametrize(
    ("overrides", "code", "said"),
    [
        ({"targets": ["q_proj", "qkv"]}, 1, "targets qkv: no such projection"),
        ({"targets": ["q_proj", "qkv"]}, 1, "valid targets: q_proj, k_proj, v_proj, o_proj"),
        ({"targets": []}, 2, "targets: List should have at least 1 item"),
        ({"rank": 0}, 2, "rank: Input should be greater than 0"),
        ({"rank": -4}, 2, "rank: Input should be greater than 0"),
        ({"alpha": 0}, 2, "alpha: Input should be greater than 0"),
        ({"dropout": 1.0}, 2, "dropout: Input should be less than 1"),
        ({"dropout": -0.1}, 2, "dropout: Input should be greater than or equal to 0"),
        ({"base": "SPLIT"}, 1, "is not a checkpoint directory (config.json and model.safetensors)"),
        ({"data": "SPLIT"}, 1, "not a pairs artifact (point `data:` at the output of the pairs"),
    ],
)
def test_bad_input_is_a_plan_error_with_the_fix(
    trained_model: Path,
    artifacts: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    overrides: dict[str, Any],
    code: int,
    said: str,
) -> None:
    settings: dict[str, Any] = {
        "base": str(trained_model),
        "data": str(artifacts["pairs"]),
        "output": str(tmp_path / "out"),
        "seq_len": 128,
        "max_steps": 10,
        "warmup_steps": 1,
        "device": "cpu",
    }
    for key, value in overrides.items():
        settings[key] = str(artifacts["split"]) if value == "SPLIT" else value
    cfg = tmp_path / "finetune.yaml"
    cfg.write_text(json.dumps(settings))
    rc, out, err = run(["finetune", "plan", str(cfg)], capsys)
    text = " ".join((out + err).split())  # the table wraps long details
    assert rc == code, text
    assert said in text and "Traceback" not in text
    assert not (tmp_path / "out").exists()
