from __future__ import annotations

import numpy as np
import pytest

from albor.data.windows import WindowSampler, eval_token_count, eval_windows
from albor.errors import DataError


def shards() -> list[np.ndarray]:
    return [np.arange(0, 1000, dtype=np.uint16), np.arange(1000, 1300, dtype=np.uint16)]


def test_batches_are_a_function_of_the_step() -> None:
    s = WindowSampler(shards(), seq_len=16, seed=3)
    a, b = s.batch(7, 0, 4), WindowSampler(shards(), seq_len=16, seed=3).batch(7, 0, 4)
    assert a.shape == (4, 17) and (a == b).all()
    assert not (s.batch(7, 1, 4) == a).all() and not (s.batch(8, 0, 4) == a).all()
    assert not (WindowSampler(shards(), 16, seed=4).batch(7, 0, 4) == a).all()


def test_windows_are_contiguous_and_never_cross_shards() -> None:
    s = WindowSampler(shards(), seq_len=16, seed=0)
    for step in range(200):
        for row in s.batch(step, 0, 8).numpy():
            assert (np.diff(row) == 1).all()  # contiguous within one shard


def test_short_data_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="lower seq_len or add data"):
        WindowSampler([np.arange(10, dtype=np.uint16)], seq_len=16, seed=0)


@pytest.mark.parametrize(("max_tokens", "batch"), [(10**6, 3), (100, 2), (1, 1)])
def test_eval_windows_score_each_target_once(max_tokens: int, batch: int) -> None:
    windows = list(eval_windows(shards(), 16, max_tokens, batch))
    targets = np.concatenate([w[:, 1:].numpy().ravel() for w in windows])
    assert len(targets) == eval_token_count(shards(), 16, max_tokens)
    assert len(set(targets.tolist())) == len(targets)
    assert all(len(w) <= batch for w in windows)
