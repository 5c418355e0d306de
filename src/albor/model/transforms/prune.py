"""Pruning: magnitude and Wanda masks (unstructured or N:M) and the removal of whole blocks.

Pure functions over weights and, for Wanda and depth, over a model in memory and calibration
token windows; nothing here reads or writes a file (`albor.stages.prune` does).

Which tensors: the blocks' linear projections (`model.layers.N.*` matrices) whose name matches
one of `targets` (regular expressions, searched; default: every q/k/v/o, gate/up/down
projection). Embeddings, norms and the output head are never candidates.

How many zeros. A tensor pruned to sparsity s gets exactly `zero_count(s, numel)` =
round(s · numel) zeros, s read as the decimal it is written as (0.3 · 10 is 3, not the
2.9999999999999996 of floating point) and halves rounded up. The mask removes exactly that many
entries whatever the ties: entries are ranked by a stable sort (score, then magnitude, then
position), so equal scores never add or drop a zero. A weight already holding more zeros of its
own than that keeps them: pruning never makes a zero nonzero.

- magnitude, `per_matrix`: the round(s · numel) smallest |W| of each matrix.
- magnitude, `global`: the round(s · total) smallest |W| over all targets together (per-tensor
  sparsity then varies; the total is exact).
- Wanda (Sun et al. 2023): score |W_ij| · ‖X_j‖₂, X_j the j-th input feature of the layer over
  every calibration token, compared within each output row i. Row i of a matrix with `cols`
  inputs gets round(s·(i+1)·cols) − round(s·i·cols) zeros: every row within one of s·cols and
  the matrix exactly round(s · numel). `wanda_prune` runs block after block: a block's inputs
  are its pruned predecessors' outputs (the Wanda repository's order).
- N:M (`Structure`, e.g. 2:4): in every group of M consecutive inputs of a row the N largest
  scores stay; sparsity is then 1 − N/M exactly (M must divide the inputs).
- depth (Gromov et al. 2024): remove n consecutive blocks, named or the span whose input and
  output hidden states are closest in angular distance arccos(cos(x, y)) / π (in [0, 1]). The
  paper measures the last token of each sequence; here every token of every window is averaged.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from albor.errors import ConfigError

if TYPE_CHECKING:
    from albor.model.config import ModelConfig
    from albor.model.gpt import GPT

StateDict = dict[str, torch.Tensor]
Scope = Literal["per_matrix", "global"]

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS: tuple[str, ...] = (r"\.(q|k|v|o|gate|up|down)_proj\.weight$",)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Structure:
    """N:M sparsity: N of every M consecutive inputs of a row stay."""

    n: int
    m: int

    @classmethod
    def parse(cls, text: str) -> Structure:
        """ "2:4" -> Structure(2, 4); ConfigError unless 1 <= N < M."""
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
        if not m:
            raise ConfigError(f"structure: {text!r} is not N:M (write it as e.g. 2:4)")
        n, size = int(m.group(1)), int(m.group(2))
        if not 1 <= n < size:
            raise ConfigError(
                f"structure: {text}: N:M keeps N of every M inputs, so it needs 1 <= N < M "
                "(e.g. 2:4)"
            )
        return cls(n, size)

    @property
    def sparsity(self) -> Fraction:
        return Fraction(self.m - self.n, self.m)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def exact(sparsity: float | Fraction) -> Fraction:
    """The decimal a float sparsity is written as (0.3 -> 3/10), not its binary neighbour."""
    if isinstance(sparsity, Fraction):
        return sparsity
    if not math.isfinite(sparsity):
        raise ConfigError(f"sparsity: {sparsity} is not a number in [0, 1)")
    return Fraction(repr(float(sparsity)))


def zero_count(sparsity: float | Fraction, numel: int) -> int:
    """round(sparsity · numel), halves up, the product taken exactly (see the module docstring)."""
    s = exact(sparsity)
    if not 0 <= s < 1:
        raise ConfigError(f"sparsity: {float(s)} is outside [0, 1): pick a fraction below 1")
    return math.floor(s * numel + Fraction(1, 2))


def row_zero_counts(sparsity: float | Fraction, rows: int, cols: int) -> torch.Tensor:
    """Zeros per row (int64, length `rows`) that sum to `zero_count(sparsity, rows * cols)`,
    each within one of sparsity · cols: the rounding of the running total, differenced."""
    s = exact(sparsity)
    totals = [zero_count(s, i * cols) for i in range(rows + 1)]
    return torch.tensor([b - a for a, b in itertools.pairwise(totals)])


def prunable(name: str, tensor: torch.Tensor, targets: Sequence[str]) -> bool:
    """A block's matrix whose name matches one of `targets` (regular expressions, searched)."""
    return (
        tensor.ndim == 2
        and _LAYER.match(name) is not None
        and any(re.search(p, name) for p in targets)
    )


def target_names(state: Mapping[str, torch.Tensor], targets: Sequence[str]) -> list[str]:
    """The names of `state` that pruning touches, in state-dict order."""
    return [k for k, t in state.items() if prunable(k, t, targets)]


def _ranks(scores: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Along the last dim, the indices that sort by (score, |weight|, position) ascending.

    The second key puts a weight that is already zero before a nonzero one of equal score, so
    a mask never spends its count on a live weight while a dead one stays in the kept set.
    """
    by_weight = torch.argsort(weight.abs(), dim=-1, stable=True)
    resorted = torch.argsort(torch.gather(scores, -1, by_weight), dim=-1, stable=True)
    return torch.gather(by_weight, -1, resorted)


def _lowest_per_row(
    scores: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Mask (True = pruned) of the `counts[i]` lowest-ranked entries of each row i."""
    order = _ranks(scores, weight)
    positions = torch.arange(scores.shape[-1], device=scores.device)
    pruned_sorted = positions < counts.to(scores.device).unsqueeze(-1)
    return torch.zeros_like(pruned_sorted).scatter_(-1, order, pruned_sorted)


def _nm_mask(scores: torch.Tensor, weight: torch.Tensor, structure: Structure) -> torch.Tensor:
    rows, cols = scores.shape
    if cols % structure.m:
        raise ConfigError(
            f"structure: {structure} needs the inputs of every pruned matrix to be a multiple "
            f"of {structure.m}; a matrix has {cols}: leave it out of `targets` or pick another M"
        )
    groups = (rows, cols // structure.m, structure.m)
    counts = torch.full(groups[:2], structure.m - structure.n, dtype=torch.int64)
    mask = _lowest_per_row(scores.reshape(groups), weight.reshape(groups), counts)
    return mask.reshape(rows, cols)


def score_mask(
    scores: torch.Tensor,
    weight: torch.Tensor,
    sparsity: float | Fraction,
    *,
    per_row: bool,
    structure: Structure | None = None,
) -> torch.Tensor:
    """Mask (True = pruned) of a (rows, cols) matrix from its scores: N:M groups when
    `structure`, else the lowest within each row (`per_row`) or within the whole matrix."""
    if scores.ndim != 2 or scores.shape != weight.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and weight {tuple(weight.shape)} differ")
    if structure is not None:
        if exact(sparsity) != structure.sparsity:
            raise ConfigError(
                f"sparsity: {float(sparsity)} with structure {structure}: N:M fixes the sparsity "
                f"at {float(structure.sparsity)}; set sparsity to that or remove structure"
            )
        return _nm_mask(scores, weight, structure)
    rows, cols = scores.shape
    if per_row:
        return _lowest_per_row(scores, weight, row_zero_counts(sparsity, rows, cols))
    count = torch.tensor([zero_count(sparsity, rows * cols)])
    return _lowest_per_row(scores.reshape(1, -1), weight.reshape(1, -1), count).reshape(rows, cols)


def magnitude_mask(
    weight: torch.Tensor, sparsity: float | Fraction, structure: Structure | None = None
) -> torch.Tensor:
    """Mask (True = pruned) of the smallest |W| of the matrix (or of each N:M group)."""
    scores = weight.detach().abs().float()
    return score_mask(scores, weight, sparsity, per_row=False, structure=structure)


def wanda_scores(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ‖X_j‖₂ for a (out, in) weight and the per-input sums of squares ‖X_j‖₂²."""
    if input_sq_norms.shape != (weight.shape[1],):
        raise ValueError(
            f"activation norms {tuple(input_sq_norms.shape)} do not match the weight's "
            f"{weight.shape[1]} inputs"
        )
    norms = input_sq_norms.to(device=weight.device, dtype=torch.float32).sqrt()
    return weight.detach().abs().float() * norms.unsqueeze(0)


def wanda_mask(
    weight: torch.Tensor,
    input_sq_norms: torch.Tensor,
    sparsity: float | Fraction,
    structure: Structure | None = None,
) -> torch.Tensor:
    """Mask (True = pruned) by Wanda's score, compared within each output row (or N:M group)."""
    scores = wanda_scores(weight, input_sq_norms)
    return score_mask(scores, weight, sparsity, per_row=True, structure=structure)


def global_magnitude_masks(
    weights: Mapping[str, torch.Tensor], sparsity: float | Fraction
) -> dict[str, torch.Tensor]:
    """Masks (True = pruned) of the round(s · total) smallest |W| over all `weights` together.

    Entries equal to the threshold are taken in the order of `weights`, then by position, until
    the count is met exactly.
    """
    total = sum(w.numel() for w in weights.values())
    k = zero_count(sparsity, total)
    masks = {n: torch.zeros(w.shape, dtype=torch.bool, device=w.device) for n, w in weights.items()}
    if k == 0:
        return masks
    flat = torch.cat([w.detach().abs().float().reshape(-1).cpu() for w in weights.values()])
    threshold = torch.kthvalue(flat, k).values
    left = k - int((flat < threshold).sum())
    del flat
    for name, w in weights.items():
        a = w.detach().abs().float()
        mask = a < threshold
        ties = (a == threshold).reshape(-1).nonzero().squeeze(-1)
        take = ties[: max(left, 0)]
        mask.reshape(-1)[take] = True
        left -= len(take)
        masks[name] = mask
    return masks


def apply_masks(state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> StateDict:
    """A new state dict: each masked tensor with its pruned entries set to zero."""
    return {k: t.masked_fill(masks[k], 0) if k in masks else t for k, t in state.items()}


def magnitude_prune(
    state: Mapping[str, torch.Tensor],
    sparsity: float | Fraction,
    *,
    scope: Scope = "per_matrix",
    structure: Structure | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
) -> StateDict:
    """`state` with its targets magnitude-pruned (per matrix, globally, or N:M)."""
    names = target_names(state, targets)
    if scope == "global":
        if structure is not None:
            raise ConfigError("structure: N:M is chosen within each group; use scope: per_matrix")
        masks = global_magnitude_masks({n: state[n] for n in names}, sparsity)
    else:
        masks = {n: magnitude_mask(state[n], sparsity, structure) for n in names}
    return apply_masks(state, masks)


@dataclass(frozen=True)
class TensorSparsity:
    zeros: int
    numel: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


def sparsity_of(
    state: Mapping[str, torch.Tensor], names: Sequence[str]
) -> dict[str, TensorSparsity]:
    """Zeros and size of each named tensor, as they are (count what was written, not asked)."""
    return {n: TensorSparsity(int((state[n] == 0).sum()), state[n].numel()) for n in names}


# ---------------------------------------------------------------------------------------------
# Over a model in memory, with calibration windows (B, T) of token ids.


def _rope(model: GPT, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from albor.model.gpt import rope_at

    return rope_at(model.cfg, torch.arange(x.shape[1], device=x.device))


@torch.no_grad()
def wanda_prune(
    model: GPT,
    windows: Sequence[torch.Tensor],
    sparsity: float | Fraction,
    *,
    structure: Structure | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
) -> list[str]:
    """Prune `model`'s targets in place by Wanda, block after block; returns their names.

    Block i's layers are scored on the activations that the already-pruned blocks 0..i-1 give
    every calibration window (kept between blocks, one tensor per window); then block i is
    pruned and run again to give block i+1 its inputs.
    """
    if not windows:
        raise ConfigError("wanda: no calibration windows: give `data` a val split with tokens")
    device = model.model.embed_tokens.weight.device
    hidden = [model.model.embed_tokens(w.to(device)) for w in windows]
    pruned: list[str] = []
    for i, block in enumerate(model.model.layers):
        layers = {
            f"model.layers.{i}.{name}.weight": module
            for name, module in block.named_modules()
            if isinstance(module, nn.Linear)
            and prunable(f"model.layers.{i}.{name}.weight", module.weight, targets)
        }
        norms = {k: torch.zeros(m.in_features, dtype=torch.float64) for k, m in layers.items()}
        hooks = [m.register_forward_hook(_accumulate(norms[k])) for k, m in layers.items()]
        try:
            for x in hidden:
                block(x, *_rope(model, x), None, None)
        finally:
            for h in hooks:
                h.remove()
        for name, module in layers.items():
            mask = wanda_mask(module.weight, norms[name], sparsity, structure)
            module.weight.masked_fill_(mask, 0)
            pruned.append(name)
        hidden = [block(x, *_rope(model, x), None, None) for x in hidden]
    return pruned


def _accumulate(
    sq_norms: torch.Tensor,
) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
    """A forward hook adding each input feature's sum of squares over the tokens to `sq_norms`."""

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0].detach().double()
        sq_norms.add_(x.pow(2).reshape(-1, x.shape[-1]).sum(0).cpu())

    return hook


def angular_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """arccos of the cosine between x and y along the last dim, over π: 0 same direction,
    1 opposite (float64)."""
    cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


@torch.no_grad()
def span_distances(model: GPT, windows: Sequence[torch.Tensor], n: int) -> list[float]:
    """For every span of `n` consecutive blocks starting at 0..L-n, the angular distance between
    the hidden state entering its first block and the one leaving its last, averaged over every
    token of `windows`."""
    layers = model.cfg.num_layers
    if not 1 <= n < layers:
        raise ConfigError(
            f"num_blocks: {n}: remove at least one block and fewer than the model's {layers}"
        )
    if not windows:
        raise ConfigError("depth: no calibration windows: give `data` a val split with tokens")
    device = model.model.embed_tokens.weight.device
    sums = torch.zeros(layers - n + 1, dtype=torch.float64)
    tokens = 0
    for w in windows:
        x = model.model.embed_tokens(w.to(device))
        states = [x]
        for block in model.model.layers:
            x = block(x, *_rope(model, x), None, None)
            states.append(x)
        for start in range(layers - n + 1):
            sums[start] += angular_distance(states[start], states[start + n]).sum().cpu()
        tokens += w.numel()
    return [float(s) / tokens for s in sums]


def closest_span(distances: Sequence[float]) -> int:
    """The first block of the span with the smallest distance (the earliest among equals)."""
    return min(range(len(distances)), key=lambda i: (distances[i], i))


def remove_blocks(
    state: Mapping[str, torch.Tensor], cfg: ModelConfig, start: int, n: int
) -> tuple[StateDict, ModelConfig]:
    """`state` without blocks start..start+n-1, the later blocks renumbered down by n, and the
    config with n fewer layers."""
    layers = cfg.num_layers
    if n < 1 or start < 0 or start + n > layers:
        raise ConfigError(
            f"blocks: {start}..{start + n - 1} is not a range of the model's blocks 0..{layers - 1}"
        )
    if n >= layers:
        raise ConfigError(f"blocks: removing all {layers} blocks leaves no model: remove fewer")
    out: StateDict = {}
    for name, t in state.items():
        m = _LAYER.match(name)
        if m is None:
            out[name] = t
            continue
        i = int(m.group(1))
        if start <= i < start + n:
            continue
        j = i - n if i >= start + n else i
        out[f"model.layers.{j}.{name[m.end() :]}"] = t
    return out, cfg.model_copy(update={"num_layers": layers - n})


def model_from_state(cfg: ModelConfig, state: Mapping[str, torch.Tensor]) -> GPT:
    """A `GPT` of `cfg` holding exactly the tensors of `state` (no copy), in eval mode."""
    from albor.model.gpt import GPT

    with torch.device("meta"):
        model = GPT(cfg)
    model.load_state_dict(dict(state), strict=True, assign=True)
    model.tie_weights()
    return model.eval()
