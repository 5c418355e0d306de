"""Training checkpoints: what resuming needs, written atomically, found again after a crash.

A checkpoint is a directory `step-NNNNNNN/` holding the HF-compatible weights (`model.safetensors`
+ `config.json`, via `albor.model.hf`), the tokenizer files, `optimizer.pt` (optimizer state and RNG
states) and `trainer_state.json` (step, tokens seen, last losses). It is written under a temporary
name and renamed into place, so a directory with the final name is always complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from albor.artifact import atomic_write_json
from albor.model.gpt import GPT
from albor.model.hf import load_pretrained, save_pretrained

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def save(
    directory: Path,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    *,
    eos_token_id: int,
    extra_files: list[Path] = (),  # type: ignore[assignment]
) -> Path:
    """Write a complete checkpoint at `directory` (replacing one that is there)."""
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp, model, optimizer, state, eos_token_id=eos_token_id, extra_files=extra_files)
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)
    return directory


def write(
    directory: Path,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    *,
    eos_token_id: int,
    extra_files: list[Path] = (),  # type: ignore[assignment]
) -> None:
    """Write the checkpoint files into an existing directory (the trainer state last)."""
    save_pretrained(model, model.cfg, directory, eos_token_id=eos_token_id)
    for f in extra_files:
        shutil.copy2(f, directory / f.name)
    torch.save(
        {"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()},
        directory / OPTIMIZER_FILE,
    )
    atomic_write_json(directory / STATE_FILE, state)


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, if any."""
    found = sorted(p for p in root.glob("step-*") if p.is_dir() and (p / STATE_FILE).exists())
    return found[-1] if found else None


def prune(root: Path, keep: int) -> None:
    """Keep only the newest `keep` checkpoints."""
    found = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in found[: max(len(found) - keep, 0)]:
        shutil.rmtree(old, ignore_errors=True)


def restore(
    directory: Path, model: GPT, optimizer: torch.optim.Optimizer, device: torch.device
) -> dict[str, Any]:
    """Load weights, optimizer and RNG state from a checkpoint; return its trainer state."""
    loaded, _ = load_pretrained(directory, device=device)
    model.load_state_dict(loaded.state_dict())
    blob = torch.load(directory / OPTIMIZER_FILE, map_location=device, weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    torch.set_rng_state(blob["torch_rng"].cpu())
    state: dict[str, Any] = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
    return state
