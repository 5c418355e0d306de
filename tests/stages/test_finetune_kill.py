"""finetune as a user runs it: `albor finetune apply` SIGKILLed mid-step and between checkpoints
resumes to the straight run's adapter bit for bit, and the adapter loads with peft onto the base
that `albor export` wrote, giving the merged model's logits."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from albor.artifact import read_manifest
from albor.model.hf import load_pretrained
from albor.stage import load_stage, run_stage
from albor.stages import export, finetune
from helpers import (
    STDLIB_SAMPLE,
    apply_command,
    last_step,
    launch_apply,
    mine_pairs,
    stdlib_texts,
    wait_for,
)

SETTINGS: dict[str, Any] = dict(
    seq_len=128,
    micro_batch=4,
    max_steps=40,
    warmup_steps=4,
    lr=1e-2,
    weight_decay=0.0,
    eval_every=20,
    eval_tokens=500,
    checkpoint_every=20,
    log_every=1,
    threads=1,
    device="cpu",
    rank=4,
)


@pytest.fixture(scope="module")
def small_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pairs artifact of the stdlib sample, mined by the real split and pairs stages."""
    root = tmp_path_factory.mktemp("small_pairs")
    return mine_pairs(root, stdlib_texts(STDLIB_SAMPLE))[1]


def settings(base: Path, data: Path, out: Path) -> dict[str, Any]:
    return {**SETTINGS, "base": str(base), "data": str(data), "output": str(out)}


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow  # three CLI processes and an export: about 35 s on two cores
def test_a_sigkilled_finetune_resumes_bit_for_bit_and_loads_on_the_exported_base(
    trained_model: Path, small_pairs: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    straight = tmp_path / "straight"
    cfg = finetune.Config.model_validate(settings(trained_model, small_pairs, straight))
    run_stage(load_stage("finetune"), cfg)

    yaml = tmp_path / "finetune.yaml"
    yaml.write_text(json.dumps(settings(trained_model, small_pairs, tmp_path / "out")))
    partial = tmp_path / ".out.partial"
    metrics = partial / "metrics.jsonl"
    # 1. SIGKILL as soon as the step-20 checkpoint exists (mid-step or mid-save).
    proc = launch_apply("finetune", yaml)
    wait_for(proc, (partial / "checkpoints" / "step-0000020" / "checkpoint.json").exists, "step 20")
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    # 2. SIGKILL between checkpoints: the steps since step 20 are lost, and replayed.
    proc = launch_apply("finetune", yaml)
    wait_for(proc, lambda: last_step(metrics) >= 25, "step 25")
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    # 3. To the end.
    done = subprocess.run(
        apply_command("finetune", yaml),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    resumed = read_manifest(tmp_path / "out")["metrics"]
    assert resumed["resumed_from"] == 20 and resumed["resume_warnings"] == []
    a, b = adapter(straight), adapter(tmp_path / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # The adapter on the base as `albor export` writes it for transformers: the merged model's
    # logits, and a visible change from the base's.
    exported = run_stage(
        load_stage("export"),
        export.Config(model=trained_model, output=tmp_path / "export", formats=["hf"]),
    ).output
    hf_dir = exported / "hf"
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        x = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
        base_logits = hf(input_ids=x).logits
        adapted = PeftModel.from_pretrained(hf, tmp_path / "out" / "adapter").eval()
        merged, _ = load_pretrained(tmp_path / "out", dtype=torch.float32)
        assert (adapted(input_ids=x).logits - merged(x)).abs().max() < 1e-4
        assert (merged(x) - base_logits).abs().max() > 1e-3
