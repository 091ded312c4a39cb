"""The precision the stages run in on this host, for tests that recompute a stage's numbers.

Training stages default to bf16 autocast on hosts with native bf16 (GPUs, AVX512-BF16/AMX CPUs)
and fp32 elsewhere (`planner_lm.hardware.fast_precision`; `PLANNER_LM_PRECISION=bf16-mixed` forces
bf16 here, as CI does for these tests). A test that recomputes a stage's figure does it under the
same autocast and compares with the tolerance of that precision: tight in fp32, looser in bf16,
where the order of summation and batch composition move the last of bf16's 8 mantissa bits.
"""
from __future__ import annotations

import contextlib

import torch

from planner_lm.hardware import fast_precision

BF16_REL_TOLERANCE = 2e-3
"""Relative tolerance of a perplexity recomputed under bf16 autocast (bf16's epsilon is 7.8e-3 per
value; averaged over hundreds of tokens the mean NLL moves by well under that)."""


def stage_uses_bf16() -> bool:
    """Whether the training stages run in bf16 autocast on this host (or as forced)."""
    return "bf16" in fast_precision()


def stage_autocast() -> contextlib.AbstractContextManager:
    """The autocast a training stage's validation ran under, to recompute its figures alike."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if stage_uses_bf16() else contextlib.nullcontext()


def stage_rel_tolerance(fp32: float) -> float:
    """`fp32` where the stage ran in fp32, else the bf16 tolerance (never tighter than `fp32`)."""
    return max(fp32, BF16_REL_TOLERANCE) if stage_uses_bf16() else fp32
