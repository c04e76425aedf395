"""Repository-wide pytest setup, shared by the tests and the docstring examples.

The hub is offline (no test touches the network), hypothesis never uses
deadlines (this machine is noisy), and every test starts from a fixed seed.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# The value checks (NaN/inf, empty bags, labels: milcell.checks) are off by default because they
# sync with the device; the suite runs with them on. tests/nn/test_host_sync.py turns them off.
os.environ.setdefault("MILCELL_CHECKS", "1")

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("dev", deadline=None, max_examples=20)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _fixed_seed() -> None:
    torch.manual_seed(0)
