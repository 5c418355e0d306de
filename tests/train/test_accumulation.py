"""Gradient accumulation is exact: k micro-batches step like one batch k times larger.

The loss of a step is the mean over every scored token of the step, so with uneven numbers of
scored tokens per micro-batch (ignored targets) the loop must divide sums by the step's token
count; averaging micro-batch means would not give the big batch's gradient.
"""

from __future__ import annotations

import copy
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from albor.model.config import ModelConfig
from albor.model.gpt import GPT
from albor.train.objectives import NextToken
from albor.train.optim import build_adamw
from albor.train.step import accumulate

CPU = torch.device("cpu")
VOCAB = 32
CFG = ModelConfig(
    vocab_size=VOCAB,
    hidden_size=16,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    intermediate_size=32,
    max_seq_len=16,
)


def model_and_copy(seed: int) -> tuple[GPT, GPT]:
    torch.manual_seed(seed)
    model = GPT(CFG)
    return model, copy.deepcopy(model)


def adamw_step(model: GPT) -> None:
    # eps well above the float noise of the gradients: Adam's first step is about
    # lr * sign(gradient), so a gradient that is zero up to rounding must not decide a sign.
    opt = build_adamw(model, 1e-2, 0.1, (0.9, 0.95), 1e-6, CPU)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


@settings(max_examples=20, deadline=None)
@given(
    k=st.integers(1, 4),
    micro=st.integers(1, 3),
    seq=st.integers(2, 8),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_k_micro_batches_step_like_one_batch_k_times_larger(
    k: int, micro: int, seq: int, masked: bool, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    if masked:  # (B, 2, T) inputs / targets, some targets ignored: uneven counts per micro-batch
        inputs = torch.randint(0, VOCAB, (k * micro, seq), generator=g)
        targets = torch.randint(0, VOCAB, (k * micro, seq), generator=g)
        drop = torch.rand(k * micro, seq, generator=g) < 0.5
        drop[0, 0] = False  # at least one scored token in the step
        targets[drop] = -100
        big = torch.stack([inputs, targets], dim=1)
    else:  # (B, T + 1) windows, every position scored
        big = torch.randint(0, VOCAB, (k * micro, seq + 1), generator=g)
    micro_batches = list(big.split(micro))
    a, b = model_and_copy(seed)

    loss_a = accumulate(a, NextToken(), micro_batches, CPU)
    loss_b = accumulate(b, NextToken(), [big], CPU)

    assert abs(loss_a - loss_b) <= 1e-5 * abs(loss_b)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert pa.grad is not None and pb.grad is not None, name
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)
    adamw_step(a)
    adamw_step(b)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-5, msg=name)


def test_the_mean_of_micro_batch_means_is_not_the_step_mean() -> None:
    """Why the loop divides sums: one scored token in the first micro-batch, eight in the second."""
    g = torch.Generator().manual_seed(0)
    pairs = torch.stack(
        [
            torch.randint(0, VOCAB, (2, 8), generator=g),
            torch.randint(0, VOCAB, (2, 8), generator=g),
        ],
        dim=1,
    )
    pairs[0, 1, 1:] = -100
    first, second = pairs[:1], pairs[1:]
    model, _ = model_and_copy(0)
    objective = NextToken()
    with torch.no_grad():
        means = [objective.loss_sum(model, m) / objective.targets(m) for m in (first, second)]
        naive = float(sum(means)) / 2
    exact = accumulate(model, objective, [first, second], CPU)
    whole = accumulate(copy.deepcopy(model), objective, [pairs], CPU)
    assert abs(exact - whole) < 1e-6
    assert abs(naive - exact) > 1e-3


def test_a_step_with_nothing_scored_is_not_finite() -> None:
    model, _ = model_and_copy(0)
    pairs = torch.zeros(1, 2, 4, dtype=torch.int64)
    pairs[:, 1] = -100
    assert math.isnan(accumulate(model, NextToken(), [pairs], CPU))
