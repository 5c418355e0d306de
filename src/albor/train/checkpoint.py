"""Training checkpoints: everything an exact resume needs, written atomically, verified on read.

One checkpoint is a directory `checkpoints/step-NNNNNNN/` (the run's final weights use the same
layout at the top of the run directory):

    model.safetensors, config.json  the weights, HF layout (`albor.model.hf`), fp32; or
    trainable.safetensors           only the trainable parameters, by their names in the model
                                    (a finetune's adapter: the frozen base is not the run's to
                                    save, and rereading it from the base is exact)
    tokenizer files                 so that every checkpoint loads on its own in transformers
    optimizer.pt                    the optimizer's state_dict (AdamW moments and step counts;
                                    with optimizer: muon, Muon's momentum and AdamW's, keyed
                                    muon and adamw)
    rng.pt                          RNG states: torch CPU, CUDA (each device), numpy, python
    trainer_state.json              step, tokens seen, loss, LR schedule and its position, data
                                    position, validation history, best so far, resume warnings
    checkpoint.json                 the manifest, written last: format, step, and every other
                                    file with its sha256 and size

It is written under the hidden name `.step-NNNNNNN.tmp/` and renamed into place, so a directory
with the final name is complete. Resuming re-hashes the newest checkpoint against its manifest
and loads it; one that is truncated, corrupted or unreadable is reported and removed, and the
one before it is used. `prune` keeps the newest `keep` checkpoints plus the one with the lowest
validation loss measured at its own step (the loop saves a checkpoint whenever validation
improves, so the best weights always have one); `checkpoints/best.json` says where the best
weights are: a kept step directory, or "." for the run's final weights.

The loop does not know the checkpoint format: it hands a `Checkpointer` the model, optimizer and
trainer state. `FullCheckpointer` writes the whole model in HF layout with the tokenizer files
(pretrain, distill); an adapter checkpointer (finetune) writes only the trained weights
(`trainable_only`), and resuming loads them over the model the run built from its base. Under
FSDP, `gather` collects the shards on rank 0 first, and `resume_ranks` has every rank resume from
the checkpoint rank 0 chose.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import nn

from albor.artifact import atomic_write_json, sha256_file
from albor.errors import AlborError, ConfigError
from albor.model.gpt import GPT
from albor.model.hf import load_pretrained, save_pretrained
from albor.train import distributed

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
MANIFEST_FILE = "checkpoint.json"
TRAINABLE_FILE = "trainable.safetensors"
BEST_FILE = "best.json"
FORMAT = 1
_STEP_DIR = re.compile(r"step-(\d+)")


class CheckpointError(AlborError):
    """A checkpoint that cannot be used: missing files, bad hashes, unreadable contents."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def step_of(directory: Path) -> int:
    """The step in a checkpoint directory's name."""
    match = _STEP_DIR.fullmatch(directory.name)
    if match is None:
        raise ValueError(f"{directory} is not named step-NNNNNNN")
    return int(match.group(1))


def checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under `root`, oldest first (temporary and hidden ones excluded)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)]
    return sorted(found, key=step_of)


# --- writing -------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, in types `torch.load(weights_only=True)` reads."""
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        # Only devices already in use: asking an untouched CUDA for its state would create a
        # context (and memory) on a GPU a CPU run never meant to use.
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def write(
    directory: Path,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    *,
    eos_token_id: int,
    extra_files: list[Path] = (),  # type: ignore[assignment]
    trainable_only: bool = False,
) -> None:
    """Write the checkpoint files into an existing directory, the manifest last.
    `trainable_only`: the parameters that train, not the model (see `TRAINABLE_FILE`)."""
    if trainable_only:
        written = [write_trainable(directory / TRAINABLE_FILE, model)]
    else:
        written = save_pretrained(model, model.cfg, directory, eos_token_id=eos_token_id)
    for f in extra_files:
        shutil.copy2(f, directory / f.name)
        written.append(directory / f.name)
    torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
    torch.save(rng_state(), directory / RNG_FILE)
    atomic_write_json(directory / STATE_FILE, state)
    written += [directory / OPTIMIZER_FILE, directory / RNG_FILE, directory / STATE_FILE]
    files = [
        {"path": p.name, "sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(set(written))
    ]
    manifest = {"format": FORMAT, "step": state.get("step"), "files": files}
    atomic_write_json(directory / MANIFEST_FILE, manifest)


def save(
    directory: Path,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    *,
    eos_token_id: int,
    extra_files: list[Path] = (),  # type: ignore[assignment]
    trainable_only: bool = False,
) -> Path:
    """Write a complete checkpoint at `directory` (replacing one that is there)."""
    tmp = directory.with_name(f".{directory.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(
        tmp,
        model,
        optimizer,
        state,
        eos_token_id=eos_token_id,
        extra_files=extra_files,
        trainable_only=trainable_only,
    )
    if directory.exists():  # a replayed step after a resume: same contents, replace it
        _remove(directory)
    tmp.rename(directory)
    return directory


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of `model` that train, by name: what a trainable-only checkpoint holds."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def write_trainable(path: Path, model: nn.Module) -> Path:
    """Save `trainable_state(model)` (CPU, contiguous, fp32 as trained) to `path`."""
    from safetensors.torch import save_file

    tensors = {n: p.detach().to("cpu").contiguous() for n, p in trainable_state(model).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def _remove(directory: Path) -> None:
    """Delete a directory so that it is never seen half-deleted: hide it first, then remove it."""
    hidden = directory.with_name(f".{directory.name}.deleting")
    if hidden.exists():
        shutil.rmtree(hidden)
    directory.rename(hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def clean(root: Path) -> None:
    """Remove what an interrupted save or prune left behind (hidden temporary directories)."""
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith(".step-"):
                shutil.rmtree(p, ignore_errors=True)


class Checkpointer(Protocol):
    """Writes what a run saves: `save` a complete checkpoint directory (atomically), `write` the
    same files into an existing directory (the run's final weights)."""

    def save(
        self, directory: Path, model: GPT, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> Path: ...

    def write(
        self, directory: Path, model: GPT, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None: ...


@dataclass(frozen=True)
class FullCheckpointer:
    """The whole model in HF layout, with the files that make each checkpoint load on its own
    in transformers (the tokenizer's) and the eos id its generation config names."""

    eos_token_id: int
    extra_files: tuple[Path, ...] = ()

    def save(
        self, directory: Path, model: GPT, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> Path:
        return save(
            directory,
            model,
            optimizer,
            state,
            eos_token_id=self.eos_token_id,
            extra_files=list(self.extra_files),
        )

    def write(
        self, directory: Path, model: GPT, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        write(
            directory,
            model,
            optimizer,
            state,
            eos_token_id=self.eos_token_id,
            extra_files=list(self.extra_files),
        )


# --- reading -------------------------------------------------------------------------------------


def verify(directory: Path) -> list[str]:
    """What is wrong with a checkpoint directory against its manifest (empty: nothing)."""
    path = directory / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != FORMAT:
            return [f"{MANIFEST_FILE} has format {manifest.get('format')!r}, not {FORMAT}"]
    except FileNotFoundError:
        return [f"no {MANIFEST_FILE} (incomplete checkpoint)"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{MANIFEST_FILE} is unreadable: {e}"]
    problems = []
    try:
        for entry in files:
            name, size = entry["path"], entry["bytes"]
            f = directory / name
            if not f.is_file():
                problems.append(f"{name} is missing")
            elif f.stat().st_size != size:
                problems.append(f"{name} has {f.stat().st_size} bytes, expected {size}")
            elif sha256_file(f) != entry["sha256"]:
                problems.append(f"{name} does not match its sha256")
    except (KeyError, TypeError) as e:
        problems.append(f"{MANIFEST_FILE} is malformed: {e}")
    return problems


@dataclass
class Loaded:
    """A checkpoint read into memory and checked, not yet applied to a model."""

    path: Path
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    state: dict[str, Any]
    partial: bool = False  # only the trainable parameters (TRAINABLE_FILE)


def _read_trainable(directory: Path, model: nn.Module, device: torch.device) -> dict[str, Any]:
    """A trainable-only checkpoint's tensors, checked against `model`'s trainable parameters."""
    from safetensors.torch import load_file

    weights = load_file(str(directory / TRAINABLE_FILE), device=str(device))
    expected = {n: tuple(p.shape) for n, p in trainable_state(model).items()}
    found = {n: tuple(t.shape) for n, t in weights.items()}
    if found != expected:
        raise CheckpointError("its trainable parameters are not this run's (another adapter)")
    return weights


def load(directory: Path, model: GPT, device: torch.device) -> Loaded:
    """Verify and read a checkpoint for `model`; CheckpointError saying why it cannot be used."""
    problems = verify(directory)
    if problems:
        raise CheckpointError("; ".join(problems))
    partial = (directory / TRAINABLE_FILE).is_file()
    try:
        if partial:
            weights = _read_trainable(directory, model, device)
        else:
            loaded, cfg = load_pretrained(directory, device=device)
            if cfg != model.cfg:
                raise CheckpointError("its config.json describes a different model")
            weights = loaded.state_dict()
        optim = torch.load(directory / OPTIMIZER_FILE, map_location=device, weights_only=True)
        rng = torch.load(directory / RNG_FILE, map_location="cpu", weights_only=True)
        state = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
    except CheckpointError:
        raise
    except Exception as e:  # any failure to read is the same verdict: this one cannot be used
        raise CheckpointError(f"unreadable: {type(e).__name__}: {e}") from e
    return Loaded(directory, weights, optim, rng, state, partial)


def optimizer_name(state: dict[str, Any]) -> str:
    """Which optimizer a saved optimizer state belongs to: muon (Muon and AdamW, keyed by name)
    or adamw."""
    return "muon" if set(state) == {"muon", "adamw"} else "adamw"


def apply(loaded: Loaded, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Put a loaded checkpoint's weights, optimizer state and RNG states in place."""
    if isinstance(optimizer, torch.optim.Optimizer):
        # Not a damaged checkpoint (which would be removed) but a changed config: say so.
        saved, now = optimizer_name(loaded.optimizer), optimizer_name(optimizer.state_dict())
        if saved != now:
            raise ConfigError(
                f"{loaded.path} was trained with optimizer: {saved}, but this run's config says "
                f"optimizer: {now}: set optimizer: {saved} to resume it, or train into a new "
                "output directory"
            )
    if loaded.partial:  # the frozen rest is the base the run was built from
        model.load_state_dict(loaded.weights, strict=False)
    else:
        model.load_state_dict(loaded.weights)
    optimizer.load_state_dict(loaded.optimizer)
    set_rng_state(loaded.rng)


@dataclass
class Resume:
    """Where a run resumes: the checkpoint used (None: from scratch), and what was skipped."""

    path: Path | None
    state: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def resume(
    root: Path, model: GPT, optimizer: torch.optim.Optimizer, device: torch.device
) -> Resume:
    """Restore the newest usable checkpoint under `root` into `model` and `optimizer`.

    Newer checkpoints that fail verification or loading are logged, listed in the warnings and
    removed: the resumed run replays those steps and writes them again.
    """
    clean(root)
    warnings: list[str] = []
    for directory in reversed(checkpoints(root)):
        try:
            loaded = load(directory, model, device)
        except CheckpointError as e:
            message = f"checkpoint {directory.name} is unusable ({e}); removed it"
            log.warning(message)
            warnings.append(message)
            _remove(directory)
            continue
        apply(loaded, model, optimizer)
        if warnings:
            log.warning("resuming from the previous checkpoint, %s", directory.name)
        return Resume(directory, loaded.state, warnings)
    if warnings:
        log.warning("no usable checkpoint is left: training starts from the beginning")
    return Resume(None, {}, warnings)


# --- keeping -------------------------------------------------------------------------------------


def val_loss_of(directory: Path) -> float | None:
    """The validation loss measured at a checkpoint's own step, if there was one."""
    try:
        state = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = state.get("val_loss")
    return float(value) if isinstance(value, int | float) else None


def best(root: Path) -> Path | None:
    """The checkpoint with the lowest validation loss (the earliest of equals), if any has one."""
    scored = [(v, step_of(p), p) for p in checkpoints(root) if (v := val_loss_of(p)) is not None]
    return min(scored)[2] if scored else None


def prune(root: Path, keep: int) -> Path | None:
    """Keep the newest `keep` checkpoints and the best by validation loss; return the best."""
    found = checkpoints(root)
    best_dir = best(root)
    for old in found[: max(len(found) - keep, 0)]:
        if old != best_dir:
            _remove(old)
    return best_dir


def write_best(root: Path, step: int, val_loss: float, path: str) -> None:
    """Record where the best weights are: `path` is relative to the run directory."""
    atomic_write_json(root / BEST_FILE, {"step": step, "val_loss": val_loss, "path": path})


# --- across ranks --------------------------------------------------------------------------------


class _FullOptimizerState:
    """Stands in for the optimizer when a checkpoint is written from a gathered state."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


def gather(
    model: GPT, optimizer: torch.optim.Optimizer, *, fsdp: bool
) -> tuple[GPT, torch.optim.Optimizer] | None:
    """What rank 0 writes as a checkpoint: the model and optimizer (None on other ranks).

    Under FSDP every rank must call it: the shards are gathered into full tensors on rank 0's
    CPU, in a plain `GPT` there, with the optimizer state keyed by parameter name (what
    `torch.distributed.checkpoint.state_dict` reads back on resume).
    """
    if not fsdp:
        return (model, optimizer) if distributed.is_rank0() else None
    weights, optim = distributed.full_state(model, optimizer)
    if not distributed.is_rank0():
        return None
    full = GPT(model.cfg)  # on rank 0's CPU, where memory is plentiful
    full.load_state_dict(weights)
    return full, cast(torch.optim.Optimizer, _FullOptimizerState(optim))


def resume_ranks(
    root: Path, model: GPT, optimizer: torch.optim.Optimizer, device: torch.device, *, fsdp: bool
) -> Resume:
    """`resume` on every rank from the same checkpoint: rank 0 picks it (removing unusable ones,
    the only writing), the others then read it."""
    if not distributed.active():
        return resume(root, model, optimizer, device)
    found = Resume(None, {}, [])
    if distributed.is_rank0():
        if fsdp:
            probe = GPT(model.cfg)  # a CPU stand-in: the choice is made by reading the files
            found = resume(root, probe, cast(torch.optim.Optimizer, _Ignore()), torch.device("cpu"))
        else:
            found = resume(root, model, optimizer, device)
    path, warnings = distributed.broadcast((found.path, found.warnings))
    if path is None:
        return Resume(None, {}, warnings)
    if fsdp:
        loaded = load(path, model, torch.device("cpu"))
        distributed.load_full_state(model, optimizer, loaded.weights, loaded.optimizer)
        set_rng_state(loaded.rng)
    elif not distributed.is_rank0():
        loaded = load(path, model, device)
        apply(loaded, model, optimizer)
    else:
        return found
    return Resume(path, loaded.state, warnings)


class _Ignore:
    """An optimizer whose state is loaded elsewhere (FSDP resume picks the checkpoint on a
    stand-in model, then loads it into the shards)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state
