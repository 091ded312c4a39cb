"""The run's seed, read one way everywhere.

Every Lightning stage seeds through LightningCLI's `seed_everything` (default 42), which records
the seed in the `PL_GLOBAL_SEED` environment variable of this process and of the processes a
strategy launches; sampling, shuffling and per-step seeds derive from it.
"""
from __future__ import annotations

import os


def global_seed(default: int = 0) -> int:
    """The seed `seed_everything` set for this run (`default` when nothing seeded the process)."""
    return int(os.environ.get("PL_GLOBAL_SEED", default))
