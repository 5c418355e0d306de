"""Training tests run torch on one thread: tiny models gain nothing from more, and on a shared
machine OpenMP threads that wait on each other make a millisecond step take a second."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
