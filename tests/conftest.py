"""Shared test settings: hypothesis profiles (``ci`` is selected when the CI variable is set)."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings

# The tests are dominated by tiny tensor operations, which run several times slower with an intra-op thread
# pool on a small shared machine than on one thread; one thread also makes timings and results repeatable.
torch.set_num_threads(1)

# local runs explore: random examples, and failures saved in .hypothesis/ are replayed first next time
settings.register_profile("dev", deadline=None, max_examples=50)
settings.register_profile(
    "ci",
    deadline=None,
    max_examples=100,
    derandomize=True,  # the same examples on every run: a red CI is reproducible
    database=None,  # and no example database: a failure saved by one run is not replayed into another
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))
