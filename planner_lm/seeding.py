"""The run's seed, read one way everywhere.

Every Lightning stage seeds through LightningCLI's `seed_everything` (default 42), which records
the seed in the `PL_GLOBAL_SEED` environment variable of this process and of the processes a
strategy launches; sampling, shuffling and per-step seeds derive from it.
"""
from __future__ import annotations

import os

DEFAULT_SEED = 42
"""`seed_everything` when none is given (every stage's default)."""


def global_seed(default: int = 0) -> int:
    """The seed `seed_everything` set for this run (`default` when nothing seeded the process)."""
    return int(os.environ.get("PL_GLOBAL_SEED", default))


def adapter_seed() -> int:
    """The seed of a joint run's adapter initialisation, derived from `seed_everything` so that a
    run with another seed differs in its initialisation as well as its data order (the null Δ of
    two `fixed` runs needs both). It is the offset from the default seed: runs with the default
    seed keep adapter seed 0, the adapters every earlier run was trained from."""
    return (global_seed(DEFAULT_SEED) - DEFAULT_SEED) % 2**63
