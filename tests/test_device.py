"""The one device resolver: auto follows the GPU, cpu stands, cuda without a GPU is an error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from albor.device import resolve
from albor.errors import ConfigError
from albor.plan import Plan


def test_cpu_stands_and_auto_follows_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve("auto") == "cuda"
    assert resolve("cuda") == "cuda"


def test_cuda_without_a_gpu_names_the_key_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"--device: cuda asked for.*set --device to cpu"):
        resolve("cuda", key="--device")
    with pytest.raises(ConfigError, match=r"^device: 'tpu' is not a device.*auto, cpu, cuda"):
        resolve("tpu")


def test_evaluate_plans_auto_as_the_device_it_will_run_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # evaluate's plan once treated "auto" as the CPU (its time estimate with it) on a GPU machine.
    from albor.model.gpt import GPT
    from albor.model.hf import save_pretrained
    from albor.model.presets import preset
    from albor.stages import evaluate

    model = GPT(preset("tiny"))
    save_pretrained(model, model.cfg, tmp_path / "m", eos_token_id=0)
    bench = tmp_path / "b.jsonl"
    row = {"id": "one", "prompt": "def one():\n", "entry_point": "one", "test": ""}
    bench.write_text(json.dumps(row) + "\n")
    task = {"task": "custom", "name": "b", "path": bench, "id_field": "id"}

    def plan(device: str) -> Plan:
        return evaluate.plan(
            evaluate.Config.model_validate(
                {
                    "model": tmp_path / "m",
                    "output": tmp_path / "o",
                    "device": device,
                    "tasks": [{**task, "generation_only": True, "max_new_tokens": 16}],
                }
            )
        )

    def device_check(p: Plan) -> str:
        (check,) = [c for c in p.checks if c.name == "device"]
        return check.detail

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert plan("auto").ok and device_check(plan("auto")) == "auto: runs on cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert plan("auto").ok and device_check(plan("auto")) == "auto: runs on cpu"
    failed = plan("cuda")
    assert [c.name for c in failed.failures] == ["device"]
    assert "set device to cpu or auto" in device_check(failed)
