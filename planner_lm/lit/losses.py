"""The next-token loss shared by LM pretraining and joint fine-tuning (one definition, so the
perplexities of both stages mean the same thing)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from planner_lm.data.lm_windows import IGNORE_INDEX

__all__ = ["next_token_nll"]


def next_token_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed next-token NLL and the number of scored tokens.

    ``labels`` are aligned with the inputs (``-100`` = not scored): position ``t`` predicts
    ``labels[t + 1]``, the Hugging Face convention. Computed in float32 whatever the logits' dtype.
    """
    targets = labels[:, 1:].reshape(-1)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    total = F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (targets != IGNORE_INDEX).sum()
