"""Evaluation over several processes: documents dealt round-robin, results gathered on rank 0.

Under `torchrun --nproc-per-node N stages/evaluate.py ...` (or any launcher that sets
`WORLD_SIZE`/`RANK`/`LOCAL_RANK`) every process scores every N-th document with every run and
code source; rank 0 gathers the per-document results in document order and writes the outputs.
Per-document NLLs do not depend on which process scored them, so the table equals the
single-process one (up to float noise of batch neighbours).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from planner_lm.evaluation.perplexity import PerplexityResult, ScoringDocument, TokenScorer, sliding_window_nll
from planner_lm.hardware import resolve_device


def process_group(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process, joining the launcher's process group if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world == 1:
        return 0, 1, device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def score_documents(documents: Sequence[ScoringDocument], scorer: TokenScorer, rank: int, world: int,
                    **windows: Any) -> PerplexityResult:
    """`sliding_window_nll` of this process's share of `documents`, gathered into document order
    on every process."""
    if world == 1:
        return sliding_window_nll(documents, scorer, **windows)
    mine = list(range(rank, len(documents), world))
    part = sliding_window_nll([documents[i] for i in mine], scorer, **windows)
    shares: list[Any] = [None] * world
    dist.all_gather_object(shares, (mine, part.doc_nll, part.doc_tokens, part.token_nll))
    doc_nll = np.zeros(len(documents), dtype=np.float64)
    doc_tokens = np.zeros(len(documents), dtype=np.int64)
    token_nll: list[np.ndarray] = [np.zeros(0, np.float32)] * len(documents)
    for ids, nll, tokens, per_token in shares:
        doc_nll[ids], doc_tokens[ids] = nll, tokens
        for i, values in zip(ids, per_token):
            token_nll[i] = values
    return PerplexityResult(doc_nll=doc_nll, doc_tokens=doc_tokens, token_nll=token_nll)
