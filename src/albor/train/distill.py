"""Knowledge distillation for a causal LM: the loss, as pure torch functions, and its objective.

At every scored position the loss is `alpha * T^2 * KL(q || p_T) + (1 - alpha) * CE`: q the
teacher's next-token distribution (its top-k renormalised over those k ids, or its whole
vocabulary), p_T the student's softmax at temperature T, CE the student's plain next-token
cross-entropy (T = 1) on the data. The T^2 keeps the KL term's gradient, `T * (p_T - q)`, on the
scale of the cross-entropy's as T grows (Hinton et al., 2015).

`topk_teacher` turns teacher logits into the (ids, log-probabilities) pairs an offline teacher
shard stores; `kd_loss_sum` scores a student against such pairs and `dense_kd_loss_sum` against
full teacher logits (the reference the top-k loss equals when k is the vocabulary). `Distill` is
the training loop's `Objective` for online distillation: the teacher runs beside the student,
forward only. `OfflineDistill` is the one for offline distillation: `TeacherLogitsSampler` draws
aligned windows with their precomputed teacher rows (a teacher_logits artifact) and packs each
micro-batch into one tensor (`pack_offline`), which the objective unpacks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from albor.data.windows import AlignedWindowSampler, aligned_window, aligned_window_count
from albor.errors import ArtifactError, ConfigError
from albor.train.objectives import NextToken

if TYPE_CHECKING:
    from pathlib import Path

    from albor.model.gpt import GPT
    from albor.train.checkpoint import Checkpointer
    from albor.train.run import TokenData
    from albor.train.settings import TrainSettings

# Per-chunk loss over scored rows only: (student logits, *teacher arrays, targets) -> scalar.
RowLoss = Callable[..., torch.Tensor]


def _check(temperature: float, alpha: float, chunk_rows: int | None) -> None:
    if not temperature > 0:
        raise ConfigError(f"distillation temperature is {temperature}: it must be above 0")
    if not 0 <= alpha <= 1:
        raise ConfigError(f"distillation alpha is {alpha}: it must be between 0 and 1")
    if chunk_rows is not None and chunk_rows < 1:
        raise ConfigError(f"chunk_rows is {chunk_rows}: give a positive row count, or None")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs (a softmax over a big vocabulary loses too much in 16
    bits); fp64 inputs stay fp64, so tests can compare to tight tolerances."""
    return torch.promote_types(dtype, torch.float32)


def topk_teacher(
    logits: torch.Tensor, k: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's k most likely token ids (int64, most likely first) per row of `logits`
    (..., V) and their log-probabilities under softmax(logits / T) over the FULL vocabulary: a
    row's k probabilities sum to at most 1 (what the other V - k tokens hold is left out).

    Computed in fp32 (fp64 for fp64 input), without gradients: this is what an offline teacher
    shard stores, and `kd_loss_sum` renormalises it over the k ids.
    """
    _check(temperature, 1.0, None)
    vocab = logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ConfigError(
            f"top-k of {k} from a vocabulary of {vocab:,} tokens: k must be between 1 and {vocab}"
        )
    with torch.no_grad():
        # The order of the logits is that of logits / T (T > 0): the top k come from the input
        # as it is, and the top-1 is the row's max. Shifted so the largest is 0, the likely
        # tokens' log-probabilities are differences of small numbers and their probabilities
        # sum to 1 within a few fp32 ulps rather than within ulps of the logits' magnitude.
        # Four passes over the row: top-k, the shift (which also casts to fp32), exp, sum.
        logits = logits.detach()
        dtype = _compute_dtype(logits.dtype)
        values, ids = logits.topk(k, dim=-1, largest=True, sorted=True)
        top = values[..., :1].to(dtype)
        shifted = torch.sub(logits, top)  # in `dtype`: a bf16 row is promoted as it is read
        if temperature != 1:
            shifted.div_(temperature)
        log_total = shifted.exp_().sum(dim=-1, keepdim=True).log()
        logprobs = (values.to(dtype) - top) / temperature - log_total
    return ids, logprobs


def _kl(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """sum q (log q - log p) over all rows; a token the teacher gives probability 0 adds 0 (and no
    gradient), not 0 * -inf."""
    q = log_q.exp()
    return (torch.xlogy(q, q) - q * log_p).sum()


def _blend(
    z: torch.Tensor,
    kl: Callable[[], torch.Tensor],
    targets: torch.Tensor,
    temperature: float,
    alpha: float,
    kl_sink: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """alpha * T^2 * KL + (1 - alpha) * CE over the rows of `z`; a term weighted 0 is not computed
    (its teacher arrays may then hold anything). The KL sum, when computed, is also appended to
    `kl_sink`, detached."""
    loss = z.new_zeros(())
    if alpha > 0:
        value = kl()
        if kl_sink is not None:
            kl_sink.append(value.detach())
        loss = loss + alpha * temperature**2 * value
    if alpha < 1:
        loss = loss + (1 - alpha) * F.cross_entropy(z, targets.long(), reduction="sum")
    return loss


def _chunked_sum(
    row_loss: RowLoss,
    student_logits: torch.Tensor,
    teacher: tuple[torch.Tensor, ...],
    targets: torch.Tensor,
    ignore_index: int,
    chunk_rows: int | None,
) -> tuple[torch.Tensor, int]:
    """Sum of `row_loss` over the scored rows, chunk by chunk of `chunk_rows` rows.

    Each chunk selects its scored rows before any arithmetic, so a masked row's values (padding,
    inf, NaN, out-of-range ids) never enter the loss and its gradient is exactly zero. With more
    than one chunk, each chunk runs under activation checkpointing: its fp32 softmaxes are
    recomputed in backward instead of kept, so memory holds one chunk's (rows x V), not the
    batch's.
    """
    lead = student_logits.shape[:-1]
    if targets.shape != lead or any(x.shape[:-1] != lead for x in teacher):
        shapes = ", ".join(str(tuple(x.shape)) for x in teacher)
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and targets {tuple(targets.shape)} "
            f"or teacher arrays ({shapes}) differ in their rows: align them row for row"
        )
    z = student_logits.reshape(-1, student_logits.shape[-1])
    rows = z.shape[0]
    y = targets.reshape(-1)
    t = tuple(x.detach().reshape(rows, x.shape[-1]) for x in teacher)
    dtype = _compute_dtype(student_logits.dtype)

    def chunk(zc: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        *tc, yc = rest
        scored = yc != ignore_index
        return row_loss(zc[scored].to(dtype), *(x[scored] for x in tc), yc[scored])

    step = rows if chunk_rows is None else chunk_rows
    recompute = step < rows and torch.is_grad_enabled() and z.requires_grad
    total: torch.Tensor | None = None
    for start in range(0, max(rows, 1), max(step, 1)):
        part_args = (z[start : start + step], *(x[start : start + step] for x in t))
        part_args += (y[start : start + step],)
        if recompute:
            part = checkpoint(chunk, *part_args, use_reentrant=False)
        else:
            part = chunk(*part_args)
        total = part if total is None else total + part
    assert total is not None
    return total, int((y != ignore_index).sum())


def kd_loss_sum(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
    kl_sink: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, int]:
    """Distillation loss against a teacher's top-k: (sum over scored rows, number of those rows).

    Shapes: `student_logits` (..., V); `teacher_ids` (..., k) int64 and `teacher_logprobs`
    (..., k), as `topk_teacher` gives them; `targets` (...). Alignment contract: row t of every
    array describes token t + 1. The student's logits at position t predict token t + 1, and so
    must row t of the teacher arrays (the teacher's distribution of token t + 1, computed from
    tokens 0..t) and `targets[t]` (token t + 1 itself); the caller shifts the teacher rows to
    match, as the model's own next-token loss shifts its targets.

    A row is scored where `targets != ignore_index`: `alpha * T^2 * KL(q || p_T) + (1 - alpha) *
    CE`, with q = softmax(teacher_logprobs) (the k probabilities renormalised to sum to 1) and
    p_T = softmax(student_logits / T) over the whole vocabulary, read at the k teacher ids.
    Other rows add exactly zero to the loss and its gradient, whatever they hold. Computed in fp32
    whatever the input dtype (fp64 stays fp64). `chunk_rows` bounds the memory of the fp32
    softmaxes to that many rows at a time; the result is the same loss, summed chunk by chunk.

    With `kl_sink` (and alpha > 0), each chunk's sum of KL(q || p_T), the term before its
    weight alpha * T^2, is appended to it detached, so a caller logs the KL without computing it
    again. A chunk recomputed under checkpointing appends again during backward: read the sink
    when this returns.
    """
    _check(temperature, alpha, chunk_rows)
    if teacher_ids.shape != teacher_logprobs.shape:
        raise ValueError(
            f"teacher ids {tuple(teacher_ids.shape)} and log-probabilities "
            f"{tuple(teacher_logprobs.shape)} differ in shape: they must pair id with value"
        )

    def rows(z: torch.Tensor, ids: torch.Tensor, lp: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        def kl() -> torch.Tensor:
            log_p = F.log_softmax(z / temperature, dim=-1).gather(-1, ids.long())
            return _kl(F.log_softmax(lp.to(z.dtype), dim=-1), log_p)

        return _blend(z, kl, y, temperature, alpha, kl_sink)

    teacher = (teacher_ids, teacher_logprobs)
    return _chunked_sum(rows, student_logits, teacher, targets, ignore_index, chunk_rows)


def dense_kd_loss_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
    kl_sink: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, int]:
    """`kd_loss_sum` against the teacher's full logits (..., V): q = softmax(teacher_logits / T)
    over the whole vocabulary. The same alignment contract, masking and `kl_sink`; equal to
    `kd_loss_sum` given `topk_teacher(teacher_logits, V, T)`. For online distillation of a small
    teacher."""
    _check(temperature, alpha, chunk_rows)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} and student logits "
            f"{tuple(student_logits.shape)} differ in shape: same positions, same vocabulary"
        )

    def rows(z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        def kl() -> torch.Tensor:
            log_q = F.log_softmax(t.to(z.dtype) / temperature, dim=-1)
            return _kl(log_q, F.log_softmax(z / temperature, dim=-1))

        return _blend(z, kl, y, temperature, alpha, kl_sink)

    return _chunked_sum(rows, student_logits, (teacher_logits,), targets, ignore_index, chunk_rows)


@dataclass(eq=False)
class RowStats:
    """Teacher-logit integrity (FALSIFY-ALBOR-006) of the top-k rows a teacher computed: kept on
    the device and read once at the end, so that no step waits on a sync."""

    rows: int = 0
    max_mass: torch.Tensor | None = None
    nonfinite: torch.Tensor | None = None

    def add(self, logprobs: torch.Tensor) -> None:
        mass = logprobs.exp().sum(dim=-1)
        top, bad = mass.max(), (~torch.isfinite(logprobs)).any(dim=-1).sum()
        self.rows += mass.numel()
        self.max_mass = top if self.max_mass is None else torch.maximum(self.max_mass, top)
        self.nonfinite = bad if self.nonfinite is None else self.nonfinite + bad

    def figures(self, top_k: int | None) -> dict[str, Any]:
        mass = None if self.max_mass is None else float(self.max_mass)
        return {
            "rows_checked": self.rows,
            # NaN where a row was not finite (nonfinite_rows counts them): JSON has no NaN.
            "max_row_mass": round(mass, 6) if mass is not None and math.isfinite(mass) else None,
            "nonfinite_rows": 0 if self.nonfinite is None else int(self.nonfinite),
            "top_k": top_k,
        }


@dataclass(eq=False)
class KlMeter:
    """The mean KL(q || p_T) per scored row over the micro-batches since it was last read: the
    `kl` of metrics.jsonl, so that FALSIFY-ALBOR-004 (KL >= 0) is observed in the run itself. It
    is the loss's own KL term, detached (measured apart only when alpha = 0 leaves it out of the
    loss), so training is the same with it; summed on the device, read (one sync) only when a
    metrics line is written."""

    total: torch.Tensor | None = None
    rows: int = 0

    def add(self, kl_sum: torch.Tensor, rows: int) -> None:
        self.total = kl_sum if self.total is None else self.total + kl_sum
        self.rows += rows

    def read(self) -> dict[str, float]:
        if self.total is None or self.rows == 0:
            return {}
        mean = float(self.total) / self.rows
        self.total, self.rows = None, 0
        return {"kl": mean}


def _measure_kl(
    meter: KlMeter,
    sink: list[torch.Tensor],
    rows: int,
    logits: torch.Tensor,
    teacher: tuple[torch.Tensor, ...],
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    chunk_rows: int | None,
) -> None:
    """Add the KL term of this micro-batch to `meter`: the loss's own (its `kl_sink`, over its
    `rows` scored rows) where the loss computed it, else (alpha = 0) a pass without gradients
    at alpha = 1, whose loss is T^2 * KL."""
    if sink:
        meter.add(torch.stack(sink).sum(), rows)
        return
    with torch.no_grad():
        z = logits.detach()
        if len(teacher) == 2:
            kl, scored = kd_loss_sum(
                z,
                *teacher,
                targets,
                temperature=temperature,
                alpha=1.0,
                ignore_index=ignore_index,
                chunk_rows=chunk_rows,
            )
        else:
            kl, scored = dense_kd_loss_sum(
                z,
                teacher[0],
                targets,
                temperature=temperature,
                alpha=1.0,
                ignore_index=ignore_index,
                chunk_rows=chunk_rows,
            )
    meter.add(kl / temperature**2, scored)


@dataclass(frozen=True, eq=False)
class Distill:
    """Online distillation: the loop's `Objective` with a teacher that runs beside the student.

    A batch is what `NextToken` takes: `(B, T + 1)` windows, or `(B, 2, T)` inputs and targets
    (targets equal to `ignore_index` not scored). The teacher reads the same inputs as the student,
    so its logits at position t are its distribution of token t + 1, the row the student's
    logits at t and `targets[t]` describe. With `top_k` the teacher's k most likely tokens are
    kept and renormalised (a `top_k` of the vocabulary size or more keeps them all); without it
    the whole distribution is. `chunk_rows` bounds the loss's fp32 softmax memory (see
    `kd_loss_sum`). The teacher is put in eval mode with gradients off.
    """

    teacher: nn.Module
    temperature: float = 2.0
    alpha: float = 0.5
    top_k: int | None = None
    ignore_index: int = -100
    chunk_rows: int | None = 4096
    rows: RowStats = field(default_factory=lambda: RowStats(), init=False, repr=False)
    kl: KlMeter = field(default_factory=lambda: KlMeter(), init=False, repr=False)

    def __post_init__(self) -> None:
        _check(self.temperature, self.alpha, self.chunk_rows)
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"distillation top_k is {self.top_k}: give k >= 1, or None for all")
        self.teacher.eval()
        self.teacher.requires_grad_(False)

    def log_metrics(self) -> dict[str, float]:
        """What the loop adds to a metrics line: the mean KL since the last line."""
        return self.kl.read()

    def integrity(self) -> dict[str, Any]:
        """The top-k rows the teacher produced in this process: how many, the largest sum of
        their k probabilities and how many held a non-finite value (all 0 without `top_k`)."""
        return self.rows.figures(self.top_k)

    def targets(self, batch: torch.Tensor) -> int:
        return NextToken(self.ignore_index).targets(batch)

    def loss_sum(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        inputs, targets = NextToken(self.ignore_index).split(batch)
        T, alpha, ignore, chunk = self.temperature, self.alpha, self.ignore_index, self.chunk_rows
        with torch.no_grad():
            teacher_logits: torch.Tensor = self.teacher(inputs)
        teacher_vocab = teacher_logits.shape[-1]
        topk: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.top_k is not None:
            # Reduced before the student's forward, so the teacher's full logits are freed first.
            topk = topk_teacher(teacher_logits, min(self.top_k, teacher_vocab), T)
            del teacher_logits
            self.rows.add(topk[1])
        logits: torch.Tensor = model(inputs)  # no targets: GPT.forward returns the logits
        if logits.shape[-1] != teacher_vocab:
            raise ConfigError(
                f"the teacher's vocabulary has {teacher_vocab:,} tokens and the student's "
                f"{logits.shape[-1]:,}: distillation compares the two distributions token id by "
                "token id, so build the student with the teacher's tokenizer (vocab_size "
                f"{teacher_vocab}) and tokenize the data with it"
            )
        sink: list[torch.Tensor] = []
        if topk is None:
            loss, rows = dense_kd_loss_sum(
                logits,
                teacher_logits,
                targets,
                temperature=T,
                alpha=alpha,
                ignore_index=ignore,
                chunk_rows=chunk,
                kl_sink=sink,
            )
        else:
            loss, rows = kd_loss_sum(
                logits,
                *topk,
                targets,
                temperature=T,
                alpha=alpha,
                ignore_index=ignore,
                chunk_rows=chunk,
                kl_sink=sink,
            )
        teacher = (teacher_logits,) if topk is None else topk
        _measure_kl(self.kl, sink, rows, logits, teacher, targets, T, ignore, chunk)
        return loss


# --- offline distillation --------------------------------------------------------------------


def pack_offline(tokens: np.ndarray, ids: np.ndarray, logprobs: np.ndarray) -> torch.Tensor:
    """One micro-batch of offline distillation as one int64 tensor `(B, 1 + 2k, T + 1)`:
    row 0 the window's T + 1 tokens; rows 1..k the teacher's ids, and rows k+1..2k the bit
    patterns (int16) of its fp16 log-probabilities, of positions 0..T-1 (column T is 0). One
    tensor, so the loop moves, pins and slices it as it does plain windows (the batch dimension
    first, for a rank's share); bit patterns, so the fp16 values come back exactly.

    `tokens` (B, T + 1); `ids` and `logprobs` (B, T, k), fp16 log-probabilities."""
    b, t1 = tokens.shape
    k = ids.shape[-1]
    out = np.zeros((b, 1 + 2 * k, t1), dtype=np.int64)
    out[:, 0] = tokens
    out[:, 1 : 1 + k, :-1] = np.swapaxes(ids, 1, 2)
    bits = np.ascontiguousarray(logprobs, dtype=np.float16).view(np.int16)
    out[:, 1 + k :, :-1] = np.swapaxes(bits, 1, 2)
    return torch.from_numpy(out)


def unpack_offline(
    batch: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`pack_offline`'s batch as (inputs (B, T), targets (B, T), ids (B, T, k) int64,
    log-probabilities (B, T, k) fp16): row t of each describes token t + 1."""
    if batch.dim() != 3 or batch.shape[1] < 3 or batch.shape[1] % 2 == 0:
        raise ValueError(
            f"an offline distillation batch is (B, 1 + 2k, T + 1); got {tuple(batch.shape)}"
        )
    k = (batch.shape[1] - 1) // 2
    tokens = batch[:, 0]
    ids = batch[:, 1 : 1 + k, :-1].transpose(1, 2)
    logprobs = batch[:, 1 + k :, :-1].to(torch.int16).view(torch.float16).transpose(1, 2)
    return tokens[:, :-1], tokens[:, 1:], ids, logprobs


class TeacherLogitsSampler:
    """Random aligned windows of the train split with the teacher's rows for them, packed
    (`pack_offline`): a deterministic function of (seed, step, micro), so a resumed run draws
    what an uninterrupted one would. `shards` are the train split's token shards and `logits`
    each one's (ids, log-probabilities) (`train/teacher.open_logits`), in the same order."""

    def __init__(
        self,
        shards: list[np.ndarray],
        logits: list[tuple[np.ndarray, np.ndarray] | None],
        seq_len: int,
        seed: int,
    ) -> None:
        if len(shards) != len(logits):
            raise ArtifactError(
                f"the data has {len(shards)} train shards and the teacher logits "
                f"{len(logits)}: compute the logits on this data (teacher_logits stage)"
            )
        counts = []
        for i, (shard, pair) in enumerate(zip(shards, logits, strict=True)):
            n = aligned_window_count(len(shard), seq_len)
            have = 0 if pair is None else pair[0].shape[0]
            if have != n:
                raise ArtifactError(
                    f"train shard {i} holds {n} windows of {seq_len + 1} tokens but its teacher "
                    f"logits {have}: compute the logits on this data with this seq_len"
                )
            counts.append(n)
        self.shards, self.logits, self.seq_len, self.seed = shards, logits, seq_len, seed
        self.windows = AlignedWindowSampler(counts, seed)

    @property
    def tokens(self) -> int:
        return self.windows.windows * self.seq_len

    def batch(self, step: int, micro: int, batch_size: int) -> torch.Tensor:
        drawn = self.windows.draw(step, micro, batch_size)
        tokens = np.stack([aligned_window(self.shards[s], w, self.seq_len) for s, w in drawn])
        pairs = [self.logits[s] for s, _ in drawn]
        assert all(p is not None for p in pairs)  # a shard without windows is never drawn
        ids = np.stack([p[0][w] for p, (_, w) in zip(pairs, drawn, strict=True) if p is not None])
        lps = np.stack([p[1][w] for p, (_, w) in zip(pairs, drawn, strict=True) if p is not None])
        return pack_offline(tokens, ids, lps)


@dataclass
class OfflineData:
    """A run's data for offline distillation: the teacher-logit windows to train on; the token
    data's validation (plain next-token bits per byte) and checkpoints."""

    tokens: TokenData
    sampler: TeacherLogitsSampler

    def checkpointer(self) -> Checkpointer:
        return self.tokens.checkpointer()

    def validation(
        self, model: GPT, settings: TrainSettings, seq_len: int, device: torch.device
    ) -> Callable[[], dict[str, Any]] | None:
        return self.tokens.validation(model, settings, seq_len, device)


def open_offline(data: Path, logits: Path, seq_len: int, seed: int) -> OfflineData:
    """The offline run data of token artifact `data` and teacher_logits artifact `logits`,
    after checking every logits file's sha256 against its manifest."""
    from albor.data.shards import open_split
    from albor.train.run import TokenData
    from albor.train.teacher import LogitsIndex, open_logits, verify_logits

    index = LogitsIndex.load(logits)
    if index.seq_len != seq_len:
        raise ArtifactError(
            f"{logits}: the teacher logits are for windows of {index.seq_len} tokens, the run's "
            f"are {seq_len}: set seq_len: {index.seq_len}, or recompute the logits"
        )
    verify_logits(logits)
    sampler = TeacherLogitsSampler(
        open_split(data, "train"), open_logits(logits, index), seq_len, seed
    )
    return OfflineData(TokenData.open(data, seq_len, seed), sampler)


@dataclass(frozen=True, eq=False)
class OfflineDistill:
    """Offline distillation: the loop's `Objective` on `pack_offline` batches, the teacher's
    top-k rows read from a teacher_logits artifact instead of computed. The loss is
    `kd_loss_sum`'s, with the artifact's `temperature` (its log-probabilities are of the
    teacher's softmax at that T); every position is scored."""

    temperature: float = 2.0
    alpha: float = 0.5
    chunk_rows: int | None = 4096
    kl: KlMeter = field(default_factory=lambda: KlMeter(), init=False, repr=False)

    def __post_init__(self) -> None:
        _check(self.temperature, self.alpha, self.chunk_rows)

    def targets(self, batch: torch.Tensor) -> int:
        return int(batch.shape[0] * (batch.shape[2] - 1))

    def log_metrics(self) -> dict[str, float]:
        """What the loop adds to a metrics line: the mean KL since the last line."""
        return self.kl.read()

    def loss_sum(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        inputs, targets, ids, logprobs = unpack_offline(batch)
        logits: torch.Tensor = model(inputs)  # no targets: GPT.forward returns the logits
        sink: list[torch.Tensor] = []
        loss, rows = kd_loss_sum(
            logits,
            ids,
            logprobs.float(),
            targets,
            temperature=self.temperature,
            alpha=self.alpha,
            chunk_rows=self.chunk_rows,
            kl_sink=sink,
        )
        teacher = (ids, logprobs.float())
        T, chunk = self.temperature, self.chunk_rows
        _measure_kl(self.kl, sink, rows, logits, teacher, targets, T, -100, chunk)
        return loss
