"""Fixtures shared by the tests (the factories are in ``tests/_factories.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for the test (restored after).

    Tiny tensors: one thread is faster and immune to a busy machine's thread contention. Use it
    for a whole module with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
