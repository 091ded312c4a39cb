"""Planner quality on held-out sentences: logits over cached contexts, accuracy and rank.

Same definitions as training (``planner_lm.lit.planner``): top-k accuracy, mean rank of the true
action (1 = ranked first) and NLL, here as plain numbers for the evaluation report.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from planner_lm.data.contexts import gather_contexts


@torch.no_grad()
def planner_logits(
    planner: torch.nn.Module,
    embeddings: np.ndarray | Tensor,
    sentence_ids: Tensor,
    doc_first_sentence: Tensor,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Logits ``[M, K]`` (float32, CPU) of the planner for each target sentence id.

    The context is the cached embeddings of the true previous sentences of the same document
    (teacher forcing), exactly what the planner saw in training.
    """
    planner = planner.eval()
    chunks = []
    for start in range(0, len(sentence_ids), batch_size):
        ids = sentence_ids[start : start + batch_size]
        context, mask = gather_contexts(
            embeddings, ids, doc_first_sentence[start : start + batch_size], planner.context_sentences
        )
        chunks.append(planner(context.to(device), mask.to(device)).float().cpu())
    if not chunks:
        return torch.zeros(0, planner.num_actions)
    return torch.cat(chunks)


def planner_scores(logits: Tensor, targets: Tensor) -> dict[str, float]:
    """``top1``, ``top5``, ``mean_rank`` and ``nll`` of ``logits [M, K]`` against ``targets [M]``."""
    if len(targets) == 0:
        return {"top1": float("nan"), "top5": float("nan"), "mean_rank": float("nan"), "nll": float("nan")}
    targets = targets.long()
    true_logit = logits.gather(1, targets[:, None])
    rank = (logits > true_logit).sum(1) + 1
    top = min(5, logits.shape[1])
    return {
        "top1": float((rank == 1).float().mean()),
        "top5": float((rank <= top).float().mean()),
        "mean_rank": float(rank.float().mean()),
        "nll": float(torch.nn.functional.cross_entropy(logits, targets)),
    }
