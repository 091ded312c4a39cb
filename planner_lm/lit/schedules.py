"""Learning-rate schedules shared by the training modules (plain functions of the step)."""
from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
import torch


def warmup_cosine(module: L.LightningModule, optimizer: torch.optim.Optimizer, warmup: int,
                  floor: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup` steps, then a cosine decay to `floor` x the peak rate at the last step.

    The total step count is asked of the trainer at the first step past warm-up, not here: asking
    for it while optimizers are configured builds the training loader before a checkpoint is
    restored, and a resumed run would then start its epoch over instead of continuing.
    """
    total: list[int] = []

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if step == warmup:
            return 1.0
        if not total:
            total.append(max(1, int(module.trainer.estimated_stepping_batches)))
        progress = min(1.0, (step - warmup) / max(1, total[0] - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


SCHEDULES: dict[str, Callable[..., torch.optim.lr_scheduler.LRScheduler] | None] = {"constant": None,
                                                                                   "cosine": warmup_cosine}
"""`lr_schedule` names of joint training: constant (the papers) or warm-up + cosine decay."""
