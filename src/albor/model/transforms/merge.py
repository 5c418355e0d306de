"""Model merging: linear, SLERP, task arithmetic, TIES and DARE over tensors and state dicts.

Every function is pure (no I/O, no global RNG): it computes in float32 and returns the dtype of
the first model's tensor. `merge_tensor` merges one named tensor (the merge stage streams a
checkpoint through it tensor by tensor); `merge_state_dicts` does the same over whole state dicts.

The methods, for models m_1..m_n, weights w_i and (where one is needed) a base b, τ_i = m_i - b:

- linear: Σ w_i·m_i / Σ w_i (weights normalised, as mergekit's `normalize: true`).
- slerp (two models): per tensor, each flattened to a vector, the great-circle interpolation
  sin((1-t)θ)/sin θ · m_1 + sin(tθ)/sin θ · m_2, θ the angle between them. Where |cos θ| >
  `COLINEAR` (0.9995, mergekit's threshold) the tensors are (anti)parallel, sin θ < 0.032 makes
  the division amplify rounding, and linear interpolation, which differs there from SLERP by under
  θ²/8 ≈ 1.3e-4 of the norm, is used instead; so is it when either tensor is zero. t = 0 gives
  m_1 exactly, t = 1 gives m_2.
- `t` (`Schedule`) is a scalar or a gradient of anchors spread evenly over the blocks: block i of
  L takes the anchors linearly interpolated at i / (L - 1). A tensor outside the blocks (the
  embeddings, the final norm and an untied lm_head) takes the first anchor, so a tied and an
  untied model merge alike. Per tensor-name rules (substring, first match wins, as mergekit's
  `filter`) override the default.
- task arithmetic: b + Σ w_i·τ_i (not normalised: the weights are the scaling λ_i).
- TIES (Yadav et al. 2023): trim each τ_i to its `kept_count(density, numel)` largest magnitudes,
  elect each entry's sign by the summed mass of the trimmed τ_i, and add to b the disjoint mean.
- DARE (Yu et al. 2023): drop each entry of each τ_i with probability p, rescale the survivors by
  1 / (1 - p) so that the expectation is τ_i, then combine linearly (b + Σ w_i·DARE(τ_i)) or by
  TIES' election and disjoint mean (no magnitude trim). The draws come from a `torch.Generator`;
  over a state dict each tensor's generator is seeded from (seed, tensor name), so a tensor's
  draws do not depend on the order tensors are merged in.

Conventions where mergekit and peft differ. We follow peft's `merge_utils` (and the TIES paper,
with the per-model weight in the role of its λ), and test against it:

- weights are applied after trimming and after the sign election: the sign is elected on the
  trimmed, unweighted τ_i by total mass (peft's `majority_sign_method="total"`; a sum of exactly
  zero elects +), where mergekit elects it on the weighted τ_i;
- the disjoint mean divides Σ w_i·τ_i over the agreeing models by how many agree, where mergekit
  (normalize: true) divides by the sum of their weights. With equal weights w the two differ by
  the factor w: merging a model with itself at weight 1 returns it under both;
- the trim keeps exactly int(density × numel) entries, the product taken as the decimal it is
  meant to be: 0.29 × 100 is 28.999999999999996 in floating point, peft's plain `int()` keeps 28,
  we keep 29 (`kept_count`). Entries of equal magnitude at the cut are chosen by `torch.topk`.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from albor.errors import ArtifactError, ConfigError

StateDict = dict[str, torch.Tensor]
Method = Literal["linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties"]
METHODS: tuple[Method, ...] = (
    "linear",
    "slerp",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
)
BASE_METHODS: frozenset[str] = frozenset({"task_arithmetic", "ties", "dare_linear", "dare_ties"})

# |cos θ| above this: the tensors are (anti)parallel and SLERP falls back to linear interpolation.
COLINEAR = 0.9995

# A block's tensors are named `model.layers.{i}.…` (transformers' Llama / Qwen2 names).
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The block a tensor belongs to, or None for the embeddings, final norm and lm_head."""
    found = _LAYER.search(name)
    return int(found.group(1)) if found else None


def num_layers(names: Sequence[str] | Mapping[str, object]) -> int:
    """How many blocks the tensor names span (0 when none is a block's)."""
    found = [i for i in (layer_index(n) for n in names) if i is not None]
    return max(found) + 1 if found else 0


# ---------------------------------------------------------------------------------------------
# single tensors


def _check_same_shape(tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> None:
    shapes = {tuple(t.shape) for t in tensors} | (
        {tuple(base.shape)} if base is not None else set()
    )
    if len(shapes) != 1:
        raise ArtifactError(f"tensors to merge differ in shape: {sorted(shapes)}")


def _weights(weights: Sequence[float], n: int) -> torch.Tensor:
    if len(weights) != n:
        raise ConfigError(f"weights: {len(weights)} weight(s) for {n} model(s): give one per model")
    return torch.tensor([float(w) for w in weights], dtype=torch.float32)


def _stacked_weights(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return w.view(-1, *([1] * (like.dim() - 1)))


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ w_i·t_i / Σ w_i, in float32, returned in the first tensor's dtype."""
    _check_same_shape(tensors)
    w = _weights(weights, len(tensors))
    total = float(w.sum())
    if not total > 0:
        raise ConfigError(f"weights {list(weights)} sum to {total:g}: they must sum to more than 0")
    stacked = torch.stack([t.float() for t in tensors])
    merged = (stacked * _stacked_weights(w, stacked)).sum(0) / total
    return merged.to(tensors[0].dtype)


def _check_t(t: float) -> None:
    if not 0.0 <= t <= 1.0:
        raise ConfigError(f"t is {t}: SLERP interpolates for t in [0, 1] (0: first model)")


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation from `a` (t = 0) to `b` (t = 1) of the flattened tensors; linear
    interpolation where they are nearly (anti)parallel or either is zero (see the module doc)."""
    _check_t(t)
    _check_same_shape([a, b])
    x, y = a.float(), b.float()
    # The angle in float64: float32 squares of tiny (or huge) entries underflow (overflow), and
    # a smallest-subnormal tensor would look orthogonal to itself.
    xd, yd = x.reshape(-1).double(), y.reshape(-1).double()
    na, nb = float(xd.norm()), float(yd.norm())
    cos = float(xd @ yd) / (na * nb) if na and nb else 1.0
    del xd, yd
    cos = min(1.0, max(-1.0, cos))
    if abs(cos) > COLINEAR:
        ca, cb = 1.0 - t, t
    else:
        theta = math.acos(cos)
        s = math.sin(theta)
        ca, cb = math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s
    return (ca * x + cb * y).to(a.dtype)


def task_arithmetic(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float]
) -> torch.Tensor:
    """b + Σ w_i·(t_i - b), in float32, returned in the first tensor's dtype."""
    _check_same_shape(tensors, base)
    w = _weights(weights, len(tensors))
    b = base.float()
    deltas = torch.stack([t.float() - b for t in tensors])
    return (b + (deltas * _stacked_weights(w, deltas)).sum(0)).to(tensors[0].dtype)


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ConfigError(
            f"density is {density}: the fraction of each task vector TIES keeps must be in (0, 1]"
        )


def kept_count(density: float, numel: int) -> int:
    """int(density × numel) for the density as the decimal it is meant to be: a product that
    misses an integer only by floating-point rounding (0.29 × 100 = 28.999999999999996) counts
    as that integer (29)."""
    exact = density * numel
    nearest = round(exact)
    if abs(exact - nearest) <= 1e-9 * max(1.0, exact):
        return int(nearest)
    return math.floor(exact)


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of exactly `kept_count(density, numel)` entries of largest |delta|."""
    _check_density(density)
    k = kept_count(density, delta.numel())
    flat = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    if k:
        flat[torch.topk(delta.reshape(-1).abs(), k).indices] = True
    return flat.view(delta.shape)


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """`delta` with all but its `kept_count(density, numel)` largest magnitudes set to zero."""
    return delta * magnitude_mask(delta, density)


def elect_sign(deltas: torch.Tensor) -> torch.Tensor:
    """Mask of the entries of stacked `deltas` (models on dim 0) whose sign is that of their
    column's summed mass (a sum of zero elects +); zero entries never agree."""
    majority = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    return deltas.sign() == majority


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """Σ over the agreeing models of the weighted deltas, divided by how many agree (at least 1)."""
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def _consensus(b: torch.Tensor, deltas: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    agree = elect_sign(deltas)
    return b + disjoint_mean(deltas * _stacked_weights(w, deltas), agree)


def ties(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float], density: float
) -> torch.Tensor:
    """TIES: trim each t_i - b to `density`, elect signs by total mass, add the disjoint mean."""
    _check_same_shape(tensors, base)
    _check_density(density)
    w = _weights(weights, len(tensors))
    b = base.float()
    deltas = torch.stack([trim(t.float() - b, density) for t in tensors])
    return _consensus(b, deltas, w).to(tensors[0].dtype)


def _check_drop(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"drop_p is {p}: DARE's drop probability must be in [0, 1)")


def dare_drop(delta: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Each entry of `delta` dropped with probability p, the survivors scaled by 1 / (1 - p)."""
    _check_drop(p)
    if p == 0.0:  # no draw: p = 0 is exactly the identity and consumes no randomness
        return delta.clone()
    keep = 1.0 - p
    mask = torch.bernoulli(torch.full_like(delta, keep), generator=generator)
    return delta * mask / keep


def dare(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    p: float,
    generator: torch.Generator,
    consensus: Literal["linear", "ties"] = "linear",
) -> torch.Tensor:
    """DARE: drop and rescale each t_i - b (one draw per model, in order, from `generator`), then
    b + Σ w_i·δ_i (linear) or TIES' sign election and disjoint mean (ties)."""
    _check_same_shape(tensors, base)
    w = _weights(weights, len(tensors))
    b = base.float()
    deltas = torch.stack([dare_drop(t.float() - b, p, generator) for t in tensors])
    if consensus == "ties":
        return _consensus(b, deltas, w).to(tensors[0].dtype)
    return (b + (deltas * _stacked_weights(w, deltas)).sum(0)).to(tensors[0].dtype)


# ---------------------------------------------------------------------------------------------
# schedules and state dicts

Anchors = float | tuple[float, ...]


def _anchors(value: Anchors) -> tuple[float, ...]:
    return (float(value),) if isinstance(value, int | float) else tuple(value)


@dataclass(frozen=True)
class Schedule:
    """SLERP's `t` per tensor: `default` unless a `rules` substring occurs in the tensor's name
    (first match wins); each a scalar or anchors spread evenly over the blocks."""

    default: Anchors = 0.5
    rules: tuple[tuple[str, Anchors], ...] = ()

    def problems(self) -> list[str]:
        found = []
        for where, value in [("t", self.default), *((f"t_rules.{k}", v) for k, v in self.rules)]:
            anchors = _anchors(value)
            if not anchors:
                found.append(f"{where}: no anchors: give a number in [0, 1] or a list of them")
            bad = [a for a in anchors if not 0.0 <= a <= 1.0]
            if bad:
                found.append(
                    f"{where}: {', '.join(f'{a:g}' for a in bad)} outside [0, 1]: SLERP's t runs "
                    "from 0 (first model) to 1 (second)"
                )
        return found

    def at(self, name: str, layers: int) -> float:
        """The t of tensor `name` in a model of `layers` blocks."""
        value = next((v for pattern, v in self.rules if pattern in name), self.default)
        anchors = _anchors(value)
        layer = layer_index(name)
        if len(anchors) == 1 or layer is None:
            return anchors[0]
        x = layer / (layers - 1) if layers > 1 else 0.0
        pos = x * (len(anchors) - 1)
        lo = min(int(pos), len(anchors) - 2)
        frac = pos - lo
        return anchors[lo] * (1.0 - frac) + anchors[lo + 1] * frac


@dataclass(frozen=True)
class MergeSpec:
    """One merge: the method and its parameters. `weights` None means equal weights for linear
    (normalised anyway) and 1.0 per model for the methods over a base."""

    method: Method
    weights: tuple[float, ...] | None = None
    t: Schedule = Schedule()
    density: float = 1.0
    drop_p: float = 0.0
    seed: int = 0

    def problems(self, models: int, has_base: bool) -> list[str]:
        """What stops this merge of `models` models (with or without a base), each with a fix."""
        found = []
        if self.method not in METHODS:
            return [f"method: {self.method!r} is not one of {', '.join(METHODS)}"]
        if self.method == "slerp" and models != 2:
            found.append(f"models: SLERP merges exactly two models; {models} given")
        elif self.method == "linear" and models < 2:
            found.append(f"models: a linear merge needs at least two models; {models} given")
        elif models < 1:
            found.append("models: list at least one model")
        needs_base = self.method in BASE_METHODS
        if needs_base and not has_base:
            found.append(f"base: {self.method} adds task vectors (model - base): set `base:`")
        if not needs_base and has_base:
            found.append(
                f"base: {self.method} does not use a base: remove it, or use task_arithmetic, "
                "ties, dare_linear or dare_ties"
            )
        if self.weights is not None and len(self.weights) != models:
            found.append(
                f"weights: {len(self.weights)} weight(s) for {models} model(s): give one per model"
            )
        elif self.method == "linear" and self.weights is not None and not sum(self.weights) > 0:
            found.append(f"weights: {list(self.weights)} sum to {sum(self.weights):g}: make it > 0")
        if self.method == "slerp":
            found += self.t.problems()
        if not 0.0 < self.density <= 1.0:
            found.append(f"density: {self.density} is outside (0, 1]")
        if not 0.0 <= self.drop_p < 1.0:
            found.append(f"drop_p: {self.drop_p} is outside [0, 1)")
        return found

    def weights_for(self, models: int) -> tuple[float, ...]:
        if self.weights is not None:
            return self.weights
        return (1.0 / models if self.method == "linear" else 1.0,) * models


def tensor_seed(seed: int, name: str) -> int:
    """The seed of tensor `name`'s DARE draws: a function of the merge seed and the name only."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def merge_tensor(
    name: str,
    tensors: Sequence[torch.Tensor],
    spec: MergeSpec,
    *,
    base: torch.Tensor | None = None,
    layers: int = 0,
) -> torch.Tensor:
    """Merge one named tensor of `len(tensors)` models (block count `layers` places it for a
    SLERP gradient); the result has the first model's dtype."""
    weights = spec.weights_for(len(tensors))
    if spec.method == "linear":
        return linear(tensors, weights)
    if spec.method == "slerp":
        return slerp(tensors[0], tensors[1], spec.t.at(name, layers))
    if base is None:
        raise ConfigError(f"{spec.method} needs a base model (task vectors are model - base)")
    if spec.method == "task_arithmetic":
        return task_arithmetic(base, tensors, weights)
    if spec.method == "ties":
        return ties(base, tensors, weights, spec.density)
    generator = torch.Generator(device=tensors[0].device).manual_seed(tensor_seed(spec.seed, name))
    consensus: Literal["linear", "ties"] = "ties" if spec.method == "dare_ties" else "linear"
    return dare(base, tensors, weights, spec.drop_p, generator, consensus)


def merge_state_dicts(
    models: Sequence[Mapping[str, torch.Tensor]],
    spec: MergeSpec,
    base: Mapping[str, torch.Tensor] | None = None,
) -> StateDict:
    """Merge state dicts tensor by tensor (every model must hold the same names and shapes)."""
    problems = spec.problems(len(models), base is not None)
    if problems:
        raise ConfigError("; ".join(problems))
    names = list(models[0])
    for i, m in enumerate(models[1:], 1):
        if set(m) != set(names):
            diff = sorted(set(m) ^ set(names))
            raise ArtifactError(f"models[{i}] holds other tensors than models[0]: {diff[:5]}")
    if base is not None and not set(names) <= set(base):
        missing = sorted(set(names) - set(base))
        raise ArtifactError(f"base lacks tensors of the models: {missing[:5]}")
    layers = num_layers(names)
    return {
        name: merge_tensor(
            name,
            [m[name] for m in models],
            spec,
            base=None if base is None else base[name],
            layers=layers,
        )
        for name in names
    }
