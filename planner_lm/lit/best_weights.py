"""The weights with the lowest validation loss seen during `fit`, kept for the hand-off.

The papers select checkpoints by validation loss; keeping a CPU copy of the trained weights at
each new best (instead of a checkpoint file per validation) lets a stage hand off the best
weights without re-reading anything, and the record travels in resume checkpoints.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from torch import nn

__all__ = ["BestWeights"]


class BestWeights:
    """Lowest validation loss so far, the step that reached it, its metrics and weights."""

    def __init__(self) -> None:
        self.loss = math.inf
        self.step = -1
        self.metrics: dict[str, float] = {}
        self.state: dict[str, Any] | None = None

    def offer(self, loss: float, step: int, module: nn.Module, names: Iterable[str] | None = None,
              metrics: dict[str, float] | None = None) -> bool:
        """Keep `module`'s weights (only `names`, default all) if `loss` is the lowest so far."""
        if not loss < self.loss:
            return False
        wanted = None if names is None else set(names)
        self.state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()
                      if wanted is None or k in wanted}
        self.loss, self.step, self.metrics = float(loss), int(step), dict(metrics or {})
        return True

    def restore(self, module: nn.Module) -> bool:
        """Load the kept weights into `module` (partial state: other weights stay); False if none."""
        if self.state is None:
            return False
        module.load_state_dict(self.state, strict=self.state.keys() == module.state_dict().keys())
        return True

    def to_checkpoint(self) -> dict[str, Any]:
        return {"loss": self.loss, "step": self.step, "metrics": self.metrics, "state": self.state}

    def load_checkpoint(self, saved: dict[str, Any] | None) -> None:
        if saved:
            self.loss, self.step = saved.get("loss", saved.get("nll", math.inf)), saved["step"]
            self.metrics, self.state = saved.get("metrics", {}), saved["state"]
