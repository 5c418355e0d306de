"""The optimizers a run can use, and the learning-rate schedule.

`adamw`: AdamW with decoupled weight decay on matrices only. `muon`: `torch.optim.Muon` for the
2-D matrices of the transformer blocks (the weights it was designed for: it orthogonalises each
matrix's update), AdamW for the embeddings, the output head, norms and biases; `MuonAdamW` steps
the two as one optimizer, so the loop and the checkpoints see one object.

Schedule: linear warmup from 0 to `lr` over `warmup_steps`, then (cosine) a cosine decay to
`lr * min_lr_ratio` at `max_steps`, or (wsd) `lr` held and a linear decay to that floor over the
last `warmdown_ratio` of the run (a floor, not zero, so late steps still learn). Under a time
budget the run's progress is the larger of the steps' and the time's, so the floor is reached at
whichever end comes first.
"""

from __future__ import annotations

import math
from collections import ChainMap
from typing import Any

import torch
from torch import nn

from albor.errors import ConfigError
from albor.train.settings import TrainSettings

MUON_TORCH = "upgrade torch to >= 2.9 or use optimizer: adamw"


def param_groups(
    params: list[nn.Parameter] | nn.Module, weight_decay: float
) -> list[dict[str, object]]:
    """Decay 2-D weights (matmuls, embeddings); leave norms and biases undecayed."""
    found = params.parameters() if isinstance(params, nn.Module) else params
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in found:
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_adamw(
    model: nn.Module | list[nn.Parameter],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    device: torch.device,
) -> torch.optim.AdamW:
    # The fused kernel is the fast path on CUDA; on CPU the foreach implementation is the default.
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=fused
    )


def muon_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The trainable parameters Muon takes (every matrix inside the transformer blocks) and the
    rest (embeddings and output head, tied or not, norms, biases), each once."""
    blocks = getattr(getattr(model, "model", None), "layers", None)
    inside = {id(p) for p in blocks.parameters()} if isinstance(blocks, nn.Module) else set()
    muon: list[nn.Parameter] = []
    other: list[nn.Parameter] = []
    for p in model.parameters():  # each shared (tied) parameter once
        if p.requires_grad:
            (muon if id(p) in inside and p.dim() >= 2 else other).append(p)
    return muon, other


def muon_problems(model: nn.Module, mode: str = "none") -> list[str]:
    """Why optimizer: muon cannot train `model` under parallelism `mode` (empty: it can); the
    fix is in each message."""
    if mode == "fsdp":  # FSDP would hand it shards, and orthogonalising a shard is not Muon
        return [
            "optimizer: muon orthogonalises whole matrices, which distributed: fsdp shards: use "
            "distributed: ddp, or optimizer: adamw"
        ]
    if not hasattr(torch.optim, "Muon"):
        return [
            f"optimizer: muon needs torch.optim.Muon, absent in torch {torch.__version__}: "
            f"{MUON_TORCH}"
        ]
    muon, _ = muon_split(model)
    if not muon:
        return [
            "optimizer: muon found no matrix in the transformer blocks (model.layers) to "
            "train: use optimizer: adamw"
        ]
    names = {id(p): n for n, p in model.named_parameters()}
    bad = [f"{names.get(id(p), '?')} {tuple(p.shape)}" for p in muon if p.dim() != 2]
    if bad:
        return [
            f"optimizer: muon takes only 2-D matrices, and this model's blocks hold "
            f"{', '.join(bad[:3])}: use optimizer: adamw"
        ]
    return []


class MuonAdamW(torch.optim.Optimizer):
    """Muon and AdamW stepped together as one optimizer: `param_groups` are both's (Muon's
    first), `state_dict` holds both, `load_state_dict` restores both."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.AdamW) -> None:
        self.muon, self.adamw = muon, adamw
        # The base class gives zero_grad and the hooks; the groups are the inner optimizers'
        # own dicts, so a learning rate set on one of them is the one the inner step uses.
        super().__init__([*muon.param_groups, *adamw.param_groups], {})
        self._share()

    def _share(self) -> None:
        self.param_groups = [*self.muon.param_groups, *self.adamw.param_groups]
        # A live read-only view of both states (the inner optimizers own and write them).
        self.state = ChainMap(self.muon.state, self.adamw.state)  # type: ignore[assignment]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = self.muon.step(closure)
        self.adamw.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"muon", "adamw"}:
            raise ValueError("not a Muon + AdamW optimizer state (keys: muon, adamw)")
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self._share()  # loading replaced the inner optimizers' group dicts


def build(
    model: nn.Module, settings: TrainSettings, device: torch.device, mode: str = "none"
) -> torch.optim.Optimizer:
    """The optimizer `settings.optimizer` names, over `model`'s trainable parameters
    (ConfigError where Muon cannot train it under parallelism `mode`)."""
    s = settings
    if s.optimizer == "adamw":
        return build_adamw(model, s.lr, s.weight_decay, s.betas, s.eps, device)
    problems = muon_problems(model, mode)
    if problems:
        raise ConfigError("; ".join(problems))
    matrices, other = muon_split(model)
    muon = torch.optim.Muon(
        matrices, lr=s.muon_lr, weight_decay=s.muon_weight_decay, momentum=0.95, nesterov=True
    )
    return MuonAdamW(muon, build_adamw(other, s.lr, s.weight_decay, s.betas, s.eps, device))


def set_lr(optimizer: torch.optim.Optimizer, lr: float, settings: TrainSettings) -> None:
    """Put the schedule's learning rate `lr` (on the scale of `settings.lr`) in every group;
    Muon's groups get it on the scale of `muon_lr`."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if isinstance(optimizer, MuonAdamW):
        for group in optimizer.muon.param_groups:
            group["lr"] = lr * (settings.muon_lr / settings.lr)


def lr_at(
    step: int,
    *,
    lr: float,
    warmup_steps: int,
    max_steps: int,
    min_lr_ratio: float,
    time_progress: float = 0.0,
    schedule: str = "cosine",
    warmdown_ratio: float = 0.3,
) -> float:
    """Learning rate for optimizer step `step` (0-based). `time_progress`: how far the run
    after warmup is through a time budget (0 without one); the schedule follows whichever of
    steps and time is further on. cosine: decay from the warmup's end; wsd: hold `lr`, then
    decay linearly over the last `warmdown_ratio` of the run."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(max_steps - warmup_steps, 1)
    progress = min(max(max(step - warmup_steps, 0) / decay_steps, time_progress), 1.0)
    floor = lr * min_lr_ratio
    if schedule == "wsd":
        return floor + (lr - floor) * min(1.0, (1.0 - progress) / warmdown_ratio)
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def time_progress(train_s: float, warmup_end_s: float | None, max_time: float | None) -> float:
    """How far the decay is through the time budget: the training time since warmup ended over
    the budget left then (0 before warmup ends or without a budget)."""
    if max_time is None or warmup_end_s is None:
        return 0.0
    return max(train_s - warmup_end_s, 0.0) / max(max_time - warmup_end_s, 1e-9)
