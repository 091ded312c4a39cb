"""What this host computes fast: the default numeric precision of every training and embedding stage,
and the device evaluation and generation run on."""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["PRECISION_ENV", "cpu_flags", "fast_precision", "resolve_device"]

PRECISION_ENV = "PLANNER_LM_PRECISION"
"""Environment variable that overrides the detected default precision on any host (e.g.
`bf16-mixed` on an AVX2 CPU, where bf16 is emulated: slow but numerically what a native-bf16 host
computes). CI sets it to run the numeric tests as native-bf16 hosts and GPUs do."""


def _cpuinfo_flags() -> set[str]:
    try:
        line = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[-1].split())


def cpu_flags() -> list[str]:
    """The CPU features that decide CPU speed here (benches quote figures next to them)."""
    return sorted(_cpuinfo_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})


def fast_precision() -> str:
    """The Lightning precision that is fastest here without giving up accuracy that matters.

    bf16 autocast (`bf16-mixed`: weights and optimizer state stay fp32) where bf16 is native:
    CUDA GPUs with bf16 (fp16 autocast with loss scaling on older GPUs), CPUs with AVX512-BF16 or
    AMX. Plain fp32 elsewhere, where bf16 is emulated and several times slower (measured: 7x
    slower on an AVX2-only AMD EPYC). `--trainer.precision` overrides it in every stage, and the
    environment variable `PLANNER_LM_PRECISION` overrides the detection itself.
    """
    forced = os.environ.get(PRECISION_ENV, "").strip()
    if forced:
        return forced
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    flags = _cpuinfo_flags()
    return "bf16-mixed" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "32-true"


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when available, else CPU), or any device string torch accepts."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
