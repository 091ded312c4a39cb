"""What this host computes fast: the default numeric precision of every training and embedding stage."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["fast_precision"]


def fast_precision() -> str:
    """The Lightning precision that is fastest here without giving up accuracy that matters.

    bf16 autocast (`bf16-mixed`: weights and optimizer state stay fp32) where bf16 is native:
    CUDA GPUs with bf16 (fp16 autocast with loss scaling on older GPUs), CPUs with AVX512-BF16 or
    AMX. Plain fp32 elsewhere, where bf16 is emulated and several times slower (measured: 7x
    slower on an AVX2-only AMD EPYC). `--trainer.precision` overrides it in every stage.
    """
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "32-true"
    return "bf16-mixed" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "32-true"
