"""The next-token objective is the model's own cross-entropy, summed, with any ignore index."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from albor.model.gpt import GPT
from albor.model.presets import preset
from albor.train.objectives import NextToken


def test_loss_sum_is_the_cross_entropy_summed_over_scored_targets() -> None:
    torch.manual_seed(0)
    model = GPT(preset("tiny"))
    inputs = torch.randint(0, 512, (2, 16))
    targets = torch.randint(0, 512, (2, 16))
    targets[0, :5] = -1  # not scored under ignore_index -1
    objective = NextToken(ignore_index=-1)
    batch = torch.stack([inputs, targets], dim=1)
    with torch.no_grad():
        got = objective.loss_sum(model, batch)
        logits = model(inputs).float()
    want = F.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="sum"
    )
    assert objective.targets(batch) == 32 - 5
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_windows_score_every_position() -> None:
    torch.manual_seed(0)
    model = GPT(preset("tiny"))
    windows = torch.randint(0, 512, (3, 9))
    objective = NextToken()
    assert objective.targets(windows) == 3 * 8
    with torch.no_grad():
        total = objective.loss_sum(model, windows)
        mean = model(windows[:, :-1], windows[:, 1:])
    torch.testing.assert_close(total, mean * 24, rtol=1e-5, atol=1e-4)
