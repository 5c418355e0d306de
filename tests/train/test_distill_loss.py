"""The distillation loss's mathematical contracts, property-tested (fp64 where a tolerance is
compared), the online `Distill` objective on tiny models, and the offline `OfflineDistill` on
packed batches of precomputed teacher rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from albor.errors import ArtifactError, ConfigError
from albor.model.gpt import GPT
from albor.model.presets import preset
from albor.train.distill import (
    Distill,
    OfflineDistill,
    TeacherLogitsSampler,
    dense_kd_loss_sum,
    kd_loss_sum,
    pack_offline,
    topk_teacher,
    unpack_offline,
)
from albor.train.objectives import NextToken, Objective

seeds = st.integers(0, 2**16)
row_counts = st.integers(1, 10)
vocabs = st.integers(2, 40)
temperatures = st.floats(0.25, 4.0)
alphas = st.floats(0.0, 1.0)
scales = st.floats(0.1, 8.0)
fractions = st.floats(0.0, 1.0)


def randn(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def top(vocab: int, fraction: float) -> int:
    """A k between 1 and the vocabulary, drawn as a fraction of it."""
    return 1 + round(fraction * (vocab - 1))


def scored_targets(gen: torch.Generator, n: int, vocab: int, masked: bool) -> torch.Tensor:
    """Targets for n rows; with `masked`, about a third of them are -100 (never all of them)."""
    y = torch.randint(0, vocab, (n,), generator=gen)
    if masked:
        drop = torch.rand(n, generator=gen) < 1 / 3
        drop[0] = False
        y[drop] = -100
    return y


@settings(max_examples=40, deadline=None)
@given(seed=seeds, n=row_counts, vocab=vocabs, frac=fractions, T=temperatures, scale=scales)
def test_kl_is_nonnegative_and_zero_against_itself(
    seed: int, n: int, vocab: int, frac: float, T: float, scale: float
) -> None:
    gen = torch.Generator().manual_seed(seed)
    z, t = randn(gen, n, vocab, scale=scale), randn(gen, n, vocab, scale=scale)
    y = scored_targets(gen, n, vocab, masked=False)
    ids, lp = topk_teacher(t, top(vocab, frac), T)
    for i in range(n):  # every row's KL, not only their sum, is >= 0
        one = slice(i, i + 1)
        row, count = kd_loss_sum(z[one], ids[one], lp[one], y[one], temperature=T, alpha=1.0)
        assert count == 1 and row.item() >= -1e-10
    dense, _ = dense_kd_loss_sum(z, t, y, temperature=T, alpha=1.0)
    assert dense.item() >= -1e-10
    ids, lp = topk_teacher(z, vocab, T)
    itself, _ = kd_loss_sum(z, ids, lp, y, temperature=T, alpha=1.0)
    assert abs(itself.item()) < 1e-6
    assert abs(dense_kd_loss_sum(z, z, y, temperature=T, alpha=1.0)[0].item()) < 1e-6


@settings(max_examples=40, deadline=None)
@given(seed=seeds, n=row_counts, vocab=vocabs, T=temperatures, alpha=alphas, masked=st.booleans())
def test_top_k_of_the_whole_vocabulary_is_the_dense_loss(
    seed: int, n: int, vocab: int, T: float, alpha: float, masked: bool
) -> None:
    gen = torch.Generator().manual_seed(seed)
    z, t = randn(gen, 2, n, vocab, scale=3), randn(gen, 2, n, vocab, scale=3)
    y = torch.stack([scored_targets(gen, n, vocab, masked) for _ in range(2)])
    ids, lp = topk_teacher(t, vocab, T)
    got, count = kd_loss_sum(z, ids, lp, y, temperature=T, alpha=alpha)
    want, dense_count = dense_kd_loss_sum(z, t, y, temperature=T, alpha=alpha)
    assert count == dense_count == int((y != -100).sum())
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, n=row_counts, vocab=vocabs, T=temperatures, mean=st.booleans())
def test_kl_gradient_is_T_times_student_minus_teacher(
    seed: int, n: int, vocab: int, T: float, mean: bool
) -> None:
    """alpha = 1, k = V: d/dz [T^2 KL(q || softmax(z/T))] = T (softmax(z/T) - q) per row, and
    that over n when the summed loss is divided by its n rows."""
    gen = torch.Generator().manual_seed(seed)
    z = randn(gen, n, vocab, scale=3).requires_grad_()
    t = randn(gen, n, vocab, scale=3)
    ids, lp = topk_teacher(t, vocab, T)
    loss, count = kd_loss_sum(z, ids, lp, torch.zeros(n, dtype=torch.long), temperature=T, alpha=1)
    (loss / count if mean else loss).backward()
    want = T * (torch.softmax(z.detach() / T, -1) - torch.softmax(t / T, -1))
    assert z.grad is not None
    torch.testing.assert_close(z.grad, want / n if mean else want, rtol=1e-9, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    seed=seeds,
    n=row_counts,
    vocab=vocabs,
    frac=fractions,
    T=temperatures,
    alpha=alphas,
    masked=st.booleans(),
)
def test_gradient_of_the_blend_for_any_k(
    seed: int, n: int, vocab: int, frac: float, T: float, alpha: float, masked: bool
) -> None:
    """The renormalised q sums to 1, so for any k the gradient of a scored row is
    alpha T (softmax(z/T) - q scattered to the vocabulary) + (1 - alpha) (softmax(z) - onehot(y)),
    and a masked row's is zero."""
    gen = torch.Generator().manual_seed(seed)
    z = randn(gen, n, vocab, scale=3).requires_grad_()
    ids, lp = topk_teacher(randn(gen, n, vocab, scale=3), top(vocab, frac), T)
    y = scored_targets(gen, n, vocab, masked)
    loss, _ = kd_loss_sum(z, ids, lp, y, temperature=T, alpha=alpha)
    loss.backward()
    q = torch.zeros(n, vocab, dtype=torch.float64).scatter(-1, ids, torch.softmax(lp, -1))
    zd, scored = z.detach(), y != -100
    onehot = F.one_hot(y.clamp(min=0), vocab).double()
    want = alpha * T * (torch.softmax(zd / T, -1) - q) + (1 - alpha) * (
        torch.softmax(zd, -1) - onehot
    )
    want[~scored] = 0
    assert z.grad is not None
    torch.testing.assert_close(z.grad, want, rtol=1e-9, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(seed=seeds, seq=st.integers(2, 12), vocab=st.integers(3, 40), scale=scales)
def test_a_one_hot_teacher_at_the_next_token_is_cross_entropy_and_a_shift_breaks_it(
    seed: int, seq: int, vocab: int, scale: float
) -> None:
    """KL to a one-hot q is the cross-entropy at that token: with the teacher's row t at token
    x[t+1] (the alignment contract), alpha = 1 and T = 1 give the next-token loss exactly."""
    gen = torch.Generator().manual_seed(seed)
    steps = torch.randint(1, vocab, (2, seq + 1), generator=gen)
    x = steps.cumsum(-1) % vocab  # x[t+1] != x[t]: a shifted teacher points elsewhere
    targets = x[:, 1:]
    # Each row's target is its most likely token by a margin of 1 or more, so any other token
    # scores at least 1 nat worse: a shifted teacher cannot match by chance.
    z = randn(gen, 2, seq, vocab, scale=scale)
    z.scatter_(-1, targets[..., None], z.amax(-1, keepdim=True) + 1)
    zeros = torch.zeros(2, seq, 1, dtype=torch.float64)
    ce = F.cross_entropy(z.flatten(0, 1), targets.flatten(), reduction="sum")
    aligned, _ = kd_loss_sum(z, targets[..., None], zeros, targets, temperature=1.0, alpha=1.0)
    torch.testing.assert_close(aligned, ce, rtol=1e-12, atol=1e-12)
    shifted, _ = kd_loss_sum(z, x[:, :-1, None], zeros, targets, temperature=1.0, alpha=1.0)
    assert shifted.item() >= ce.item() + 2 * seq - 1e-9


@settings(max_examples=40, deadline=None)
@given(seed=seeds, n=st.integers(2, 10), vocab=vocabs, frac=fractions, T=temperatures, alpha=alphas)
def test_masked_rows_add_nothing_whatever_they_hold(
    seed: int, n: int, vocab: int, frac: float, T: float, alpha: float
) -> None:
    gen = torch.Generator().manual_seed(seed)
    k = top(vocab, frac)
    z = randn(gen, n, vocab, scale=3)
    t = randn(gen, n, vocab, scale=3)
    ids, lp = topk_teacher(t, k, T)
    y = scored_targets(gen, n, vocab, masked=True)
    y[-1] = -100  # at least one masked row
    scored = y != -100
    want, want_count = kd_loss_sum(
        z[scored], ids[scored], lp[scored], y[scored], temperature=T, alpha=alpha
    )
    dense_want, _ = dense_kd_loss_sum(z[scored], t[scored], y[scored], temperature=T, alpha=alpha)
    # Garbage where nothing is scored: non-finite logits, out-of-range ids, -inf log-probabilities.
    z, t, ids, lp = z.clone(), t.clone(), ids.clone(), lp.clone()
    z[~scored] = float("nan")
    z[~scored, 0] = float("inf")
    t[~scored] = float("-inf")
    ids[~scored] = vocab + 7
    lp[~scored] = float("-inf")
    z.requires_grad_()
    got, count = kd_loss_sum(z, ids, lp, y, temperature=T, alpha=alpha)
    got.backward()
    assert count == want_count == int(scored.sum())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert z.grad is not None and torch.equal(z.grad[~scored], torch.zeros_like(z.grad[~scored]))
    assert torch.isfinite(z.grad).all()
    dense, _ = dense_kd_loss_sum(z, t, y, temperature=T, alpha=alpha)
    torch.testing.assert_close(dense, dense_want, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    seed=seeds,
    n=row_counts,
    vocab=vocabs,
    frac=fractions,
    T=temperatures,
    alpha=alphas,
    chunk=st.integers(1, 12),
    dense=st.booleans(),
)
def test_chunked_equals_unchunked_in_sum_and_gradient(
    seed: int, n: int, vocab: int, frac: float, T: float, alpha: float, chunk: int, dense: bool
) -> None:
    gen = torch.Generator().manual_seed(seed)
    z = randn(gen, 2, n, vocab, scale=3)
    t = randn(gen, 2, n, vocab, scale=3)
    ids, lp = topk_teacher(t, top(vocab, frac), T)
    y = torch.stack([scored_targets(gen, n, vocab, masked=True) for _ in range(2)])

    def run(chunk_rows: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
        zz = z.clone().requires_grad_()
        if dense:
            loss, count = dense_kd_loss_sum(
                zz, t, y, temperature=T, alpha=alpha, chunk_rows=chunk_rows
            )
        else:
            loss, count = kd_loss_sum(
                zz, ids, lp, y, temperature=T, alpha=alpha, chunk_rows=chunk_rows
            )
        loss.backward()
        assert zz.grad is not None
        return loss.detach(), zz.grad, count

    whole, whole_grad, whole_count = run(None)
    parts, parts_grad, parts_count = run(chunk)
    assert parts_count == whole_count
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(parts_grad, whole_grad, rtol=1e-12, atol=1e-14)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, vocab=vocabs, frac=fractions, T=temperatures, scale=scales, bf16=st.booleans())
def test_topk_teacher_keeps_the_k_most_likely_with_full_vocabulary_logprobs(
    seed: int, vocab: int, frac: float, T: float, scale: float, bf16: bool
) -> None:
    gen = torch.Generator().manual_seed(seed)
    k = top(vocab, frac)
    logits = randn(gen, 3, 4, vocab, scale=scale).to(torch.bfloat16 if bf16 else torch.float64)
    ids, lp = topk_teacher(logits, k, T)
    assert ids.dtype == torch.int64 and ids.shape == lp.shape == (3, 4, k)
    assert lp.dtype == (torch.float32 if bf16 else torch.float64)
    wide = logits.double()
    # The k largest (ties may pick either id, so compare the values they carry).
    want = wide.sort(dim=-1, descending=True).values[..., :k]
    torch.testing.assert_close(wide.gather(-1, ids), want, rtol=0, atol=0)
    assert torch.isfinite(lp).all()
    assert (lp[..., 1:] <= lp[..., :-1]).all()  # most likely first
    assert (lp.double().exp().sum(-1) <= 1 + 1e-6).all()
    full = torch.log_softmax(wide / T, dim=-1).gather(-1, ids)
    rtol, atol = (1e-5, 1e-4) if bf16 else (1e-12, 1e-12)
    torch.testing.assert_close(lp.double(), full, rtol=rtol, atol=atol)


def test_16_bit_logits_are_scored_in_fp32() -> None:
    gen = torch.Generator().manual_seed(0)
    z = randn(gen, 6, 300, scale=4).to(torch.bfloat16)
    t = randn(gen, 6, 300, scale=4)
    y = torch.randint(0, 300, (6,), generator=gen)
    ids, lp = topk_teacher(t, 16, 2.0)
    got, _ = kd_loss_sum(z, ids, lp, y, temperature=2.0, alpha=0.5)
    want, _ = kd_loss_sum(z.float(), ids, lp.float(), y, temperature=2.0, alpha=0.5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_term_weighted_zero_is_not_computed() -> None:
    """alpha = 0 never reads the teacher (NaN rows are fine) and alpha = 1 never reads the
    targets' ids (ids past the vocabulary are fine): each is the other term alone."""
    gen = torch.Generator().manual_seed(8)
    z, t = randn(gen, 4, 9, scale=2), randn(gen, 4, 9, scale=2)
    y = torch.randint(0, 9, (4,), generator=gen)
    ids, lp = topk_teacher(t, 5, 2.0)
    ce = F.cross_entropy(z, y, reduction="sum")
    nan = torch.full_like(lp, float("nan"))
    torch.testing.assert_close(kd_loss_sum(z, ids, nan, y, temperature=2.0, alpha=0.0)[0], ce)
    torch.testing.assert_close(
        dense_kd_loss_sum(z, torch.full_like(t, float("nan")), y, temperature=2.0, alpha=0.0)[0],
        ce,
    )
    far = y + 100
    kl_only, _ = kd_loss_sum(z, ids, lp, y, temperature=2.0, alpha=1.0)
    torch.testing.assert_close(kd_loss_sum(z, ids, lp, far, temperature=2.0, alpha=1.0)[0], kl_only)
    dense_kl, _ = dense_kd_loss_sum(z, t, y, temperature=2.0, alpha=1.0)
    torch.testing.assert_close(
        dense_kd_loss_sum(z, t, far, temperature=2.0, alpha=1.0)[0], dense_kl
    )


def test_16_bit_teacher_logits_are_scored_in_the_students_precision() -> None:
    gen = torch.Generator().manual_seed(9)
    z = randn(gen, 5, 300, scale=4).float()
    t = randn(gen, 5, 300, scale=4).to(torch.bfloat16)
    y = torch.randint(0, 300, (5,), generator=gen)
    got, _ = dense_kd_loss_sum(z, t, y, temperature=2.0, alpha=0.5)
    want, _ = dense_kd_loss_sum(z, t.float(), y, temperature=2.0, alpha=0.5)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_topk_teacher_normalises_each_row_on_its_own_scale() -> None:
    """Rows hundreds of nats apart, at a low temperature: each row's log-probabilities are its
    own softmax's, finite, never overflowing or underflowing against another row's scale."""
    logits = torch.stack([torch.linspace(0, 1, 50), torch.linspace(0, 1, 50) + 80.0])
    for dtype in (torch.bfloat16, torch.float32):
        ids, lp = topk_teacher(logits.to(dtype), 4, 0.2)
        assert torch.isfinite(lp).all()
        want = torch.log_softmax(logits.to(dtype).double() / 0.2, -1).gather(-1, ids)
        torch.testing.assert_close(lp.double(), want, rtol=1e-5, atol=1e-5)


def test_bad_settings_are_config_errors_that_name_the_setting() -> None:
    z, y = torch.zeros(2, 5), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ConfigError, match="temperature"):
        dense_kd_loss_sum(z, z, y, temperature=0.0, alpha=0.5)
    with pytest.raises(ConfigError, match="alpha"):
        dense_kd_loss_sum(z, z, y, temperature=1.0, alpha=1.5)
    with pytest.raises(ConfigError, match="top-k of 6"):
        topk_teacher(z, 6, 1.0)
    with pytest.raises(ValueError, match=r"\(3,\) or teacher arrays \(\(2, 5\)\).*row for row"):
        dense_kd_loss_sum(z, z, torch.zeros(3, dtype=torch.long), temperature=1.0, alpha=0.5)
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\(2, 3\) and log-probabilities \(2, 4\) differ"):
        kd_loss_sum(z, ids, torch.zeros(2, 4), y, temperature=1.0, alpha=0.5)
    with pytest.raises(ValueError, match=r"\(2, 6\) and student logits \(2, 5\) differ"):
        dense_kd_loss_sum(z, torch.zeros(2, 6), y, temperature=1.0, alpha=0.5)
    for loss, teacher in ((kd_loss_sum, (ids, torch.zeros(2, 3))), (dense_kd_loss_sum, (z,))):
        with pytest.raises(ConfigError, match="chunk_rows is 0"):
            loss(z, *teacher, y, temperature=1.0, alpha=0.5, chunk_rows=0)  # type: ignore[operator]


def tiny(seed: int, **overrides: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(preset("tiny", **overrides))


@pytest.mark.parametrize("top_k", [None, 8, 10_000])
def test_distill_objective_scores_the_student_against_its_teacher(top_k: int | None) -> None:
    teacher, student = tiny(1), tiny(2)
    windows = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(3))
    objective: Objective = Distill(teacher, temperature=2.0, alpha=0.3, top_k=top_k, chunk_rows=5)
    assert objective.targets(windows) == 2 * 16
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    loss = objective.loss_sum(student, windows)
    loss.backward()
    inputs, targets = windows[:, :-1], windows[:, 1:]
    with torch.no_grad():
        z, t = student(inputs), teacher(inputs)
    if top_k is None or top_k >= 512:
        want, _ = dense_kd_loss_sum(z, t, targets, temperature=2.0, alpha=0.3)
    else:
        ids, lp = topk_teacher(t, top_k, 2.0)
        want, _ = kd_loss_sum(z, ids, lp, targets, temperature=2.0, alpha=0.3)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-4)
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


class NextOf(nn.Module):
    """An oracle teacher for sequences that count up by one: all its mass on (token + 1) mod V."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.unused = nn.Linear(1, 1)  # a parameter, to see it frozen

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return 30.0 * F.one_hot((input_ids + 1) % self.vocab, self.vocab).float()


def test_distill_aligns_the_teacher_with_the_next_token() -> None:
    """On counting sequences the oracle's top-1 at position t is token t + 1: alpha = 1, T = 1 is
    then the student's own next-token loss, for windows and for (inputs, targets) with a mask."""
    student = tiny(4)
    windows = (torch.arange(17) + torch.tensor([[0], [100]])) % 512
    objective = Distill(NextOf(512), temperature=1.0, alpha=1.0, top_k=1)
    with torch.no_grad():
        torch.testing.assert_close(
            objective.loss_sum(student, windows), NextToken().loss_sum(student, windows)
        )
        inputs, targets = windows[:, :-1], windows[:, 1:].clone()
        targets[0, :4] = -1
        pairs = torch.stack([inputs, targets], dim=1)
        masked = Distill(NextOf(512), temperature=1.0, alpha=1.0, top_k=1, ignore_index=-1)
        assert masked.targets(pairs) == 32 - 4
        torch.testing.assert_close(
            masked.loss_sum(student, pairs), NextToken(ignore_index=-1).loss_sum(student, pairs)
        )
        # The whole distribution (no top_k) skips the same positions.
        dense = Distill(NextOf(512), temperature=1.0, alpha=1.0, ignore_index=-1)
        torch.testing.assert_close(
            dense.loss_sum(student, pairs), NextToken(ignore_index=-1).loss_sum(student, pairs)
        )


def test_distill_refuses_a_teacher_of_another_vocabulary() -> None:
    objective = Distill(tiny(1, vocab_size=640), temperature=2.0, alpha=0.5)
    with pytest.raises(ConfigError, match=r"640 tokens.*512.*with the teacher's tokenizer"):
        objective.loss_sum(tiny(2), torch.randint(0, 512, (1, 9)))


def test_distill_settings_are_checked_when_built() -> None:
    with pytest.raises(ConfigError, match="top_k"):
        Distill(tiny(1), top_k=0)
    with pytest.raises(ConfigError, match="alpha"):
        Distill(tiny(1), alpha=-0.1)
    with pytest.raises(ConfigError, match="chunk_rows is 0"):
        Distill(tiny(1), chunk_rows=0)


@settings(max_examples=40, deadline=None)
@given(
    seed=seeds,
    b=st.integers(1, 4),
    seq=st.integers(1, 12),
    k=st.integers(1, 20),
    special=st.sampled_from([0.0, -0.0, float("-inf"), float("nan"), -65504.0, 6e-8]),
)
def test_an_offline_batch_unpacks_to_exactly_what_was_packed(
    seed: int, b: int, seq: int, k: int, special: float
) -> None:
    """Packing keeps every fp16 bit pattern (even -0, -inf, NaN, subnormals) and every id, in
    one int64 tensor the loop can move and slice like plain windows."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 70_000, (b, seq + 1), generator=gen).numpy()
    ids = torch.randint(0, 70_000, (b, seq, k), generator=gen).numpy().astype("uint32")
    lps = (-torch.rand(b, seq, k, generator=gen, dtype=torch.float64) * 30).numpy()
    lps = lps.astype("float16")
    lps[0, 0, 0] = special
    batch = pack_offline(tokens, ids, lps)
    assert batch.shape == (b, 1 + 2 * k, seq + 1) and batch.dtype == torch.int64
    inputs, targets, got_ids, got_lps = unpack_offline(batch)
    assert torch.equal(inputs, torch.from_numpy(tokens[:, :-1]))
    assert torch.equal(targets, torch.from_numpy(tokens[:, 1:]))
    assert torch.equal(got_ids, torch.from_numpy(ids.astype("int64")))
    assert got_lps.dtype == torch.float16
    assert torch.equal(got_lps.view(torch.int16), torch.from_numpy(lps.view("int16")))
    # A rank's share of the batch is its rows, as for plain windows.
    assert torch.equal(unpack_offline(batch[b - 1 :])[2], got_ids[b - 1 :])


def teacher_rows(teacher: nn.Module, windows: torch.Tensor, k: int, T: float) -> torch.Tensor:
    """What the teacher_logits stage stores for `windows`, packed as the sampler packs it."""
    with torch.no_grad():
        ids, lp = topk_teacher(teacher(windows[:, :-1]), k, T)
    return pack_offline(windows.numpy(), ids.numpy().astype("uint16"), lp.half().numpy())


def test_offline_objective_is_kd_loss_on_the_unpacked_rows() -> None:
    teacher, student = tiny(1), tiny(2)
    windows = torch.randint(0, 512, (3, 17), generator=torch.Generator().manual_seed(5))
    batch = teacher_rows(teacher, windows, 8, 2.0)
    objective: Objective = OfflineDistill(temperature=2.0, alpha=0.3, chunk_rows=7)
    assert objective.targets(batch) == 3 * 16
    loss = objective.loss_sum(student, batch)
    loss.backward()
    inputs, targets, ids, lps = unpack_offline(batch)
    with torch.no_grad():
        z = student(inputs)
    want, _ = kd_loss_sum(z, ids, lps.float(), targets, temperature=2.0, alpha=0.3)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.detach(), want, rtol=1e-6, atol=1e-5)
    assert all(p.grad is not None for p in student.parameters())


@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_offline_with_k_the_vocabulary_is_online_distillation(alpha: float) -> None:
    """Precomputed rows of the whole vocabulary (fp16) give the online loss on the same windows,
    within what fp16 log-probabilities move it."""
    teacher, student = tiny(1), tiny(2)
    windows = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(6))
    offline = OfflineDistill(temperature=2.0, alpha=alpha)
    online = Distill(teacher, temperature=2.0, alpha=alpha, top_k=None)
    with torch.no_grad():
        got = offline.loss_sum(student, teacher_rows(teacher, windows, 512, 2.0))
        want = online.loss_sum(student, windows)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=0.0)


def test_offline_rows_are_aligned_with_the_next_token() -> None:
    """With the counting oracle's rows (top-1, T = 1, alpha = 1) the offline loss is the
    student's own next-token loss; the rows of one position later score a student that knows
    the next token as wrong."""
    windows = (torch.arange(17) + torch.tensor([[0], [100]])) % 512
    rows = teacher_rows(NextOf(512), windows, 1, 1.0)
    late = teacher_rows(NextOf(512), (windows + 1) % 512, 1, 1.0)
    late[:, 0] = windows  # the tokens as they are, the rows one position ahead
    objective = OfflineDistill(temperature=1.0, alpha=1.0)
    student = tiny(4)
    with torch.no_grad():
        got = objective.loss_sum(student, rows)
        torch.testing.assert_close(got, NextToken().loss_sum(student, windows))
        assert objective.loss_sum(NextOf(512), rows) < 1e-6
        assert objective.loss_sum(NextOf(512), late) > 30 * 16


def test_offline_settings_are_checked_when_built() -> None:
    with pytest.raises(ConfigError, match="temperature"):
        OfflineDistill(temperature=0.0)
    with pytest.raises(ConfigError, match="chunk_rows is 0"):
        OfflineDistill(chunk_rows=0)
    with pytest.raises(ValueError, match=r"\(B, 1 \+ 2k, T \+ 1\)"):
        OfflineDistill().loss_sum(tiny(1), torch.zeros(2, 4, 9, dtype=torch.int64))
    # Not (B, 1 + 2k, T + 1): plain windows, and a batch without teacher rows.
    for shape in [(2, 9), (2, 1, 9), (1, 2, 3, 9)]:
        with pytest.raises(ValueError, match=r"\(B, 1 \+ 2k, T \+ 1\)"):
            unpack_offline(torch.zeros(shape, dtype=torch.int64))


def test_packing_stores_log_probabilities_in_fp16_whatever_float_they_come_in() -> None:
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 512, (2, 6), generator=gen).numpy()
    ids = torch.randint(0, 512, (2, 5, 3), generator=gen).numpy()
    wide = (-torch.rand(2, 5, 3, generator=gen, dtype=torch.float64) * 20).numpy()
    for given_as in (wide, wide.astype(np.float32)):
        lps = unpack_offline(pack_offline(tokens, ids, given_as))[3]
        assert torch.equal(lps, torch.from_numpy(wide.astype(np.float16)))


def test_teacher_logits_sampler_pairs_each_window_with_its_rows() -> None:
    """Hermetic shards whose tokens say where they are and rows that say which window and
    token they describe: every drawn row is an aligned window with that window's rows, row t
    the teacher's for token t + 1, as a function of (seed, step, micro)."""
    seq, k = 4, 3
    lengths = [23, 3, 10]  # 5, 0 and 2 aligned windows of 5 tokens
    shards = [1000 * s + np.arange(n, dtype=np.int64) for s, n in enumerate(lengths)]
    logits: list[tuple[np.ndarray, np.ndarray] | None] = []
    for s, shard in enumerate(shards):
        n = (len(shard) - 1) // seq
        if n == 0:
            logits.append(None)
            continue
        nxt = np.stack([shard[w * seq + 1 : w * seq + seq + 1] for w in range(n)])
        ids = nxt[..., None] * 10 + np.arange(k)  # (n, seq, k): rank j of token t + 1
        lps = -np.broadcast_to((100 * s + np.arange(n))[:, None, None], (n, seq, k))
        logits.append((ids, lps.astype(np.float16)))
    sampler = TeacherLogitsSampler(shards, logits, seq, seed=5)
    assert sampler.tokens == (5 + 0 + 2) * seq
    batch = sampler.batch(3, 1, 16)
    assert batch.shape == (16, 1 + 2 * k, seq + 1)
    assert torch.equal(batch, sampler.batch(3, 1, 16))
    assert not torch.equal(batch, sampler.batch(4, 1, 16))
    inputs, targets, ids, lps = unpack_offline(batch)
    drawn = set()
    for row in range(16):
        shard, start = divmod(int(inputs[row, 0]), 1000)
        window = start // seq
        assert start % seq == 0 and window < (lengths[shard] - 1) // seq
        drawn.add((shard, window))
        want = torch.from_numpy(shards[shard][start : start + seq + 1])
        assert torch.equal(inputs[row], want[:-1]) and torch.equal(targets[row], want[1:])
        assert torch.equal(ids[row], targets[row][:, None] * 10 + torch.arange(k))
        assert bool((lps[row] == -(100 * shard + window)).all())
    assert {s for s, _ in drawn} == {0, 2}  # both shards with windows, never the empty one


def test_teacher_logits_sampler_refuses_rows_of_other_data() -> None:
    shards = [np.arange(21, dtype=np.int64), np.arange(9, dtype=np.int64)]  # 5 and 2 windows
    rows = [
        (np.zeros((5, 4, 2), dtype=np.int64), np.zeros((5, 4, 2), dtype=np.float16)),
        (np.zeros((2, 4, 2), dtype=np.int64), np.zeros((2, 4, 2), dtype=np.float16)),
    ]
    TeacherLogitsSampler(shards, rows, 4, seed=0)
    with pytest.raises(ArtifactError, match="2 train shards and the teacher logits 1"):
        TeacherLogitsSampler(shards, rows[:1], 4, seed=0)
    with pytest.raises(ArtifactError, match="shard 1 holds 2 windows of 5 tokens but its teacher"):
        TeacherLogitsSampler(shards, [rows[0], rows[0]], 4, seed=0)
    with pytest.raises(ArtifactError, match="shard 0 holds 5 windows of 5 tokens but its teacher"):
        TeacherLogitsSampler(shards, [None, rows[1]], 4, seed=0)


class Broken(NextOf):
    """The oracle with one position's logits NaN, as a diverged teacher would give."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(input_ids)
        out[0, 3] = float("nan")
        return out


def test_the_online_teacher_rows_are_checked_as_they_come() -> None:
    """FALSIFY-ALBOR-006 for an online teacher: every top-k row it computes is counted, its
    largest probability mass kept (at most 1 for a sound teacher), and non-finite rows counted."""
    student = tiny(4)
    windows = (torch.arange(17) + torch.tensor([[0], [100]])) % 512
    sound = Distill(NextOf(512), temperature=1.0, alpha=0.5, top_k=8)
    assert sound.integrity() == {
        "rows_checked": 0,
        "max_row_mass": None,
        "nonfinite_rows": 0,
        "top_k": 8,
    }
    with torch.no_grad():
        sound.loss_sum(student, windows)
        sound.loss_sum(student, windows)
    rows = sound.integrity()
    assert rows["rows_checked"] == 2 * 2 * 16 and rows["nonfinite_rows"] == 0
    assert 0.999 < rows["max_row_mass"] <= 1 + 1e-6
    broken = Distill(Broken(512), temperature=1.0, alpha=0.5, top_k=8)
    with torch.no_grad():
        broken.loss_sum(student, windows)
    assert broken.integrity()["nonfinite_rows"] == 1
    assert broken.integrity()["max_row_mass"] is None  # NaN, which JSON cannot hold


@pytest.mark.parametrize("alpha", [0.5, 0.0])
def test_the_kl_term_is_measured_for_the_metrics_lines(alpha: float) -> None:
    """FALSIFY-ALBOR-004 in the run: the objective reports the mean KL per scored row since the
    last metrics line. Against a one-hot teacher at the next token (top-1, T = 1) the KL is the
    student's cross-entropy, and reading it starts the next mean afresh. At alpha = 0 the loss
    leaves the KL out and it is measured apart."""
    student = tiny(4)
    windows = (torch.arange(17) + torch.tensor([[0], [100]])) % 512
    objective = Distill(NextOf(512), temperature=1.0, alpha=alpha, top_k=1)
    assert objective.log_metrics() == {}
    with torch.no_grad():
        objective.loss_sum(student, windows)
        objective.loss_sum(student, windows)
        ce = NextToken().loss_sum(student, windows) / NextToken().targets(windows)
    measured = objective.log_metrics()
    assert measured["kl"] >= 0
    assert measured["kl"] == pytest.approx(float(ce), rel=1e-5)
    assert objective.log_metrics() == {}


@settings(max_examples=30, deadline=None)
@given(
    seed=seeds,
    n=row_counts,
    vocab=vocabs,
    frac=fractions,
    T=temperatures,
    alpha=alphas,
    chunk=st.integers(1, 12),
    dense=st.booleans(),
)
def test_the_kl_sink_holds_the_losses_own_kl_term(
    seed: int, n: int, vocab: int, frac: float, T: float, alpha: float, chunk: int, dense: bool
) -> None:
    """The sink's chunks sum to the KL term the loss weighs (the loss at alpha = 1, over T^2),
    read when the loss returns, whatever the chunking and the recompute in backward; a loss that
    weighs the KL 0 leaves it empty (the term was not computed)."""
    gen = torch.Generator().manual_seed(seed)
    z = randn(gen, n, vocab, scale=3).requires_grad_()
    t = randn(gen, n, vocab, scale=3)
    ids, lp = topk_teacher(t, top(vocab, frac), T)
    y = scored_targets(gen, n, vocab, masked=True)

    def loss(a: float, sink: list[torch.Tensor] | None) -> torch.Tensor:
        kw = dict(temperature=T, alpha=a, chunk_rows=chunk, kl_sink=sink)
        if dense:
            return dense_kd_loss_sum(z, t, y, **kw)[0]  # type: ignore[arg-type]
        return kd_loss_sum(z, ids, lp, y, **kw)[0]  # type: ignore[arg-type]

    sink: list[torch.Tensor] = []
    total = loss(alpha, sink)
    read = torch.stack(sink).sum() if sink else None
    total.backward()  # chunks recomputed here append again: the read above is what counts
    if alpha == 0:
        assert read is None
        return
    assert read is not None and not read.requires_grad
    expected = loss(1.0, None).detach() / T**2
    torch.testing.assert_close(read, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.4, 0.0])
@pytest.mark.parametrize("top_k", [4, None])
def test_the_logged_kl_is_the_mean_kl_of_the_scored_rows(alpha: float, top_k: int | None) -> None:
    """The `kl` of a metrics line, written out by hand: the mean over the scored rows of
    KL(q || p_T), q the teacher's (top-k, renormalised) softmax at T, p_T the student's; masked
    rows left out. The same whether the loss computed it (alpha > 0) or it was measured apart
    (alpha = 0), at a temperature where T^2 != 1."""
    teacher, student = tiny(1), tiny(2)
    gen = torch.Generator().manual_seed(5)
    inputs = torch.randint(0, 512, (2, 16), generator=gen)
    targets = torch.randint(0, 512, (2, 16), generator=gen)
    targets[0, :5] = -100
    batch = torch.stack([inputs, targets], dim=1)  # (B, 2, T): inputs and masked targets
    T = 2.0
    objective = Distill(teacher, temperature=T, alpha=alpha, top_k=top_k, chunk_rows=7)
    objective.loss_sum(student, batch)
    with torch.no_grad():
        log_q = F.log_softmax(teacher(inputs).double() / T, dim=-1)
        log_p = F.log_softmax(student(inputs).double() / T, dim=-1)
    if top_k is not None:
        log_q, ids = log_q.topk(top_k, dim=-1)
        log_q = F.log_softmax(log_q, dim=-1)
        log_p = log_p.gather(-1, ids)
    per_row = (log_q.exp() * (log_q - log_p)).sum(-1)
    expected = float(per_row[targets != -100].mean())
    assert objective.log_metrics()["kl"] == pytest.approx(expected, rel=1e-5)
