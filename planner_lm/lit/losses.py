"""The next-token loss shared by LM pretraining and joint fine-tuning (one definition, so the
perplexities of both stages mean the same thing), and the global-batch mean that makes a loss
mean the same on 1 or N processes."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from planner_lm.data.lm_windows import IGNORE_INDEX

__all__ = ["global_batch_mean", "next_token_nll"]


def next_token_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed next-token NLL and the number of scored tokens.

    ``labels`` are aligned with the inputs (``-100`` = not scored): position ``t`` predicts
    ``labels[t + 1]``, the Hugging Face convention. Computed in float32 whatever the logits' dtype.
    """
    targets = labels[:, 1:].reshape(-1)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    total = F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (targets != IGNORE_INDEX).sum()


def global_batch_mean(total: Tensor, count: Tensor, module: Any) -> Tensor:
    """``total / count`` taken over the global batch of all processes, for the backward pass.

    DDP averages gradients over the N processes, so each divides its own sum by the all-process
    count over N: the gradient is then the single-process gradient of the whole global batch,
    even when the processes scored different numbers of tokens (a per-process mean would weight a
    short window's tokens more). One process: the plain mean.
    """
    trainer = getattr(module, "_trainer", None)
    world = trainer.world_size if trainer is not None else 1
    if world > 1:
        count = trainer.strategy.reduce(count.detach().float(), reduce_op="sum") / world
    return total / count.clamp(min=1)
