"""Checkpoints: exact round trip, a verified manifest, fallback past damaged ones, what is kept."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from albor.artifact import sha256_file
from albor.model.gpt import GPT
from albor.model.presets import preset
from albor.train import checkpoint
from albor.train.optim import build_adamw

CPU = torch.device("cpu")


def trained(seed: int, steps: int = 2) -> tuple[GPT, torch.optim.AdamW]:
    """A tiny model and an AdamW that has taken `steps` steps (so its moments are not empty)."""
    torch.manual_seed(seed)
    model = GPT(preset("tiny"))
    opt = build_adamw(model, 1e-3, 0.1, (0.9, 0.95), 1e-8, CPU)
    for _ in range(steps):
        x = torch.randint(0, 512, (2, 9))
        model(x[:, :-1], targets=x[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def save_steps(root: Path, steps: list[int]) -> GPT:
    model, opt = trained(0)
    for step in steps:
        with torch.no_grad():
            model.model.norm.weight.fill_(step)  # each checkpoint's weights tell its step
        checkpoint.save(
            checkpoint.step_dir(root, step),
            model,
            opt,
            {"step": step, "tokens": step * 8},
            eos_token_id=0,
        )
    return model


def test_a_checkpoint_restores_weights_optimizer_and_every_rng(tmp_path: Path) -> None:
    model, opt = trained(0)
    torch.manual_seed(5)
    np.random.seed(6)
    random.seed(7)
    checkpoint.save(
        tmp_path / "step-0000003", model, opt, {"step": 3, "tokens": 24}, eos_token_id=0
    )
    expected = (torch.rand(4), np.random.rand(4), random.random())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}

    other, other_opt = trained(1, steps=3)  # different weights, moments and RNG positions
    resumed = checkpoint.resume(tmp_path, other, other_opt, CPU)
    assert resumed.path == tmp_path / "step-0000003" and resumed.warnings == []
    assert resumed.state["step"] == 3 and resumed.state["tokens"] == 24
    for k, v in other.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for k, v in other_opt.state_dict()["state"][0].items():
        assert torch.equal(v, moments[k]), k
    assert torch.equal(torch.rand(4), expected[0])
    assert np.array_equal(np.random.rand(4), expected[1])
    assert random.random() == expected[2]


def test_the_manifest_lists_every_file_with_its_hash(tmp_path: Path) -> None:
    save_steps(tmp_path, [10])
    d = tmp_path / "step-0000010"
    manifest = json.loads((d / checkpoint.MANIFEST_FILE).read_text())
    assert manifest["format"] == 1 and manifest["step"] == 10
    listed = {f["path"] for f in manifest["files"]}
    on_disk = {p.name for p in d.iterdir()} - {checkpoint.MANIFEST_FILE}
    assert (
        listed
        == on_disk
        == {
            "config.json",
            "model.safetensors",
            "optimizer.pt",
            "rng.pt",
            "trainer_state.json",
        }
    )
    assert checkpoint.verify(d) == []
    assert not list(tmp_path.glob(".*"))  # no temporary directory left behind


def _flip_a_byte(d: Path) -> None:
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))


def _truncate(d: Path) -> None:
    f = d / "optimizer.pt"
    f.write_bytes(f.read_bytes()[:100])


def _unreadable_but_hashed(d: Path) -> None:
    """A file whose bytes match the manifest but cannot be loaded (written wrong, not damaged)."""
    (d / "optimizer.pt").write_bytes(b"not a torch file")
    manifest = json.loads((d / checkpoint.MANIFEST_FILE).read_text())
    for f in manifest["files"]:
        if f["path"] == "optimizer.pt":
            f["bytes"] = 16
            f["sha256"] = sha256_file(d / "optimizer.pt")
    (d / checkpoint.MANIFEST_FILE).write_text(json.dumps(manifest))


DAMAGE: dict[str, tuple[Callable[[Path], object], str]] = {
    "bad hash": (_flip_a_byte, "model.safetensors does not match its sha256"),
    "truncated": (_truncate, "optimizer.pt has 100 bytes"),
    "missing file": (lambda d: (d / "rng.pt").unlink(), "rng.pt is missing"),
    "no manifest": (lambda d: (d / "checkpoint.json").unlink(), "no checkpoint.json"),
    "bad manifest": (lambda d: (d / "checkpoint.json").write_text("{"), "is unreadable"),
    "unloadable": (_unreadable_but_hashed, "unreadable: UnpicklingError"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    save_steps(tmp_path, [10, 20, 30])
    spoil, reason = DAMAGE[damage]
    spoil(tmp_path / "step-0000030")
    model, opt = trained(1)
    with caplog.at_level(logging.WARNING):
        resumed = checkpoint.resume(tmp_path, model, opt, CPU)
    assert resumed.path == tmp_path / "step-0000020" and resumed.state["step"] == 20
    assert float(model.model.norm.weight[0].detach()) == 20.0
    assert len(resumed.warnings) == 1 and "step-0000030" in resumed.warnings[0]
    assert reason in resumed.warnings[0], resumed.warnings
    assert "step-0000030 is unusable" in caplog.text
    # The damaged one is gone: the resumed run writes that step again.
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step-0000010", "step-0000020"]


def test_with_no_usable_checkpoint_the_run_starts_over_untouched(tmp_path: Path) -> None:
    save_steps(tmp_path, [10])
    _flip_a_byte(tmp_path / "step-0000010")
    model, opt = trained(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    resumed = checkpoint.resume(tmp_path, model, opt, CPU)
    assert resumed.path is None and resumed.state == {} and len(resumed.warnings) == 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_what_an_interrupted_save_leaves_is_ignored_and_cleaned(tmp_path: Path) -> None:
    save_steps(tmp_path, [10])
    half = tmp_path / ".step-0000020.tmp"  # killed while writing step 20
    half.mkdir()
    (half / "trainer_state.json").write_text('{"step": 20}')
    (tmp_path / ".step-0000005.deleting").mkdir()  # killed while pruning
    model, opt = trained(1)
    resumed = checkpoint.resume(tmp_path, model, opt, CPU)
    assert resumed.path == tmp_path / "step-0000010" and resumed.warnings == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000010"]


def _fake(root: Path, step: int, val_loss: float | None) -> None:
    d = checkpoint.step_dir(root, step)
    d.mkdir(parents=True)
    (d / checkpoint.STATE_FILE).write_text(json.dumps({"step": step, "val_loss": val_loss}))


def test_prune_keeps_the_newest_and_never_the_best_by_validation(tmp_path: Path) -> None:
    for step, val in [(10, 2.0), (20, 1.5), (30, 1.8), (40, 1.9), (50, None)]:
        _fake(tmp_path, step, val)
    assert checkpoint.prune(tmp_path, keep=2) == tmp_path / "step-0000020"
    assert [checkpoint.step_of(p) for p in checkpoint.checkpoints(tmp_path)] == [20, 40, 50]
    for step in (60, 70, 80):  # later, worse validations never push the best out
        _fake(tmp_path, step, 1.6)
        checkpoint.prune(tmp_path, keep=2)
    assert [checkpoint.step_of(p) for p in checkpoint.checkpoints(tmp_path)] == [20, 70, 80]
    _fake(tmp_path, 90, 1.5)  # a tie: the earliest stays the best
    _fake(tmp_path, 100, 1.0)
    assert checkpoint.prune(tmp_path, keep=1) == tmp_path / "step-0000100"
    assert [checkpoint.step_of(p) for p in checkpoint.checkpoints(tmp_path)] == [100]
