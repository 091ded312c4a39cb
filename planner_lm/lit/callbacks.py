"""Training callbacks: the unfreeze schedule of joint fine-tuning and the last-validation record."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import lightning as L
from torch import nn

from planner_lm.errors import UserError

__all__ = ["LastValidation", "UnfreezeSchedule", "resolve_unfreeze_step"]


def resolve_unfreeze_step(at: int | float | None, total_steps: int | float) -> int | None:
    """Global step at which to unfreeze, or None for never.

    ``at`` is a step count (int >= 0; 0 = trainable from the start), a fraction of the total
    optimizer steps (float in [0, 1)), or negative / None for never.
    """
    if at is None or at < 0:
        return None
    if isinstance(at, bool):
        raise UserError("unfreeze_at must be a step (int) or a fraction (float), not a bool")
    if isinstance(at, float):
        if at >= 1.0:
            if not at.is_integer():
                raise UserError(
                    f"unfreeze_at={at}: a float means a fraction of training in [0, 1); "
                    "write an integer for a step number"
                )
            return int(at)
        if not math.isfinite(total_steps):
            raise UserError("a fractional unfreeze_at needs a finite number of training steps (set max_steps or max_epochs)")
        return int(round(at * total_steps))
    return int(at)


class UnfreezeSchedule(L.Callback):
    """Holds some parameters still until a given GLOBAL optimizer step, then trains them.

    The parameters keep ``requires_grad`` throughout: DDP fixes at wrap time which parameters it
    synchronises and expects a gradient for each of them at every step, so toggling it would
    either stop the all-reduce after unfreezing (ranks drift apart silently) or fail with
    "parameters that were not used in producing the loss". Instead, while held, their
    (synchronised) gradients are dropped just before the optimizer step, so the optimizer skips
    them exactly as it skips a frozen parameter.

    The reference compared the step with the per-epoch ``batch_idx``, so with several epochs it
    unfroze again at each epoch and with gradient accumulation too early; here the check uses
    ``trainer.global_step`` (optimizer steps), which also makes it correct after a resume.

    Args:
        name: what is unfrozen, for the log message and the logged flag (e.g. "planner").
        parameters: returns the parameters to hold, given the LightningModule.
        at: step (int), fraction of total steps (float in [0, 1)), or negative for never.
    """

    def __init__(self, name: str, parameters: Callable[[L.LightningModule], Iterable[nn.Parameter]],
                 at: int | float | None) -> None:
        self.name, self._parameters, self.at = name, parameters, at
        self.step: int | None = None
        self.trainable = False  # decided in on_train_start, once the number of steps is known

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.step = resolve_unfreeze_step(self.at, trainer.estimated_stepping_batches)
        self.trainable = self.step is not None and trainer.global_step >= self.step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if not self.trainable and self.step is not None and trainer.global_step >= self.step:
            self.trainable = True
            if trainer.global_step > 0:
                print(f"[step {trainer.global_step}] {self.name} unfrozen")
        pl_module.log(f"train/{self.name}_trainable", float(self.trainable), on_step=True, on_epoch=False)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if not self.trainable:
            for parameter in self._parameters(pl_module):
                parameter.grad = None


class LastValidation(L.Callback):
    """Remembers the metrics of the latest validation during fit and the step it ran at.

    Lets a stage report the final weights' validation metrics without validating them twice when
    fit's schedule already ended with a validation (`planner_lm.cli.final_validation`).
    """

    def __init__(self) -> None:
        self.step: int | None = None
        self.metrics: dict[str, float] = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self.step = trainer.global_step
        self.metrics = {key: float(value) for key, value in trainer.callback_metrics.items()
                        if key.startswith("val/")}
