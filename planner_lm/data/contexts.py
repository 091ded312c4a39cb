"""Planner contexts: the cached embeddings of the sentences before a target sentence.

Shared by planner pretraining, joint training, evaluation and generation, so it is pure index
arithmetic over the global sentence ids (see docs/DEVELOPING.md): a document's sentences are
`first_sentence .. first_sentence + n - 1`, hence the context of sentence `j` is
`max(first, j - S) .. j - 1` and never crosses into the previous document.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def context_indices(sentence_ids: Tensor, doc_first_sentence: Tensor, context_sentences: int) -> tuple[Tensor, Tensor]:
    """Global ids of the previous <= S sentences of each target, right-aligned.

    Returns `(indices [M, S], mask [M, S])`: slot `s` holds sentence `j - S + s`, so the last slot
    is the sentence right before the target. Slots before the document start are masked out and
    point at the target's document start (any valid row would do; they are zeroed later).
    """
    sentence_ids = torch.as_tensor(sentence_ids, dtype=torch.long)
    doc_first_sentence = torch.as_tensor(doc_first_sentence, dtype=torch.long).to(sentence_ids.device)
    if sentence_ids.shape != doc_first_sentence.shape or sentence_ids.dim() != 1:
        raise ValueError(
            f"sentence_ids and doc_first_sentence must be 1-D of equal length, got "
            f"{tuple(sentence_ids.shape)} and {tuple(doc_first_sentence.shape)}"
        )
    if bool((doc_first_sentence > sentence_ids).any()):
        raise ValueError("a sentence id lies before its document's first sentence")
    offsets = torch.arange(-context_sentences, 0, device=sentence_ids.device)
    indices = sentence_ids[:, None] + offsets[None, :]
    first = doc_first_sentence[:, None]
    mask = indices >= first
    return torch.where(mask, indices, first), mask


def gather_contexts(
    embeddings: Tensor | np.ndarray,
    sentence_ids: Tensor,
    doc_first_sentence: Tensor,
    context_sentences: int,
) -> tuple[Tensor, Tensor]:
    """Embeddings of the previous <= S sentences of each target sentence, same document only.

    Args:
        embeddings: `[N, D]` sentence embeddings indexed by global sentence id: a torch tensor
            (any device) or a NumPy array / `np.memmap` (e.g. `np.load(..., mmap_mode="r")`),
            from which only the needed rows are read.
        sentence_ids: `[M]` global ids of the target sentences.
        doc_first_sentence: `[M]` global id of the first sentence of each target's document.
        context_sentences: S, the number of slots.

    Returns:
        `context` float32 `[M, S, D]` (oldest first, right-aligned: the last slot is the sentence
        right before the target; masked slots are zero) and `mask` bool `[M, S]`, True for a real
        previous sentence. On the tensor's device for tensor inputs, on the CPU for NumPy inputs.
    """
    indices, mask = context_indices(sentence_ids, doc_first_sentence, context_sentences)
    num_targets = indices.shape[0]
    if isinstance(embeddings, np.ndarray):
        flat = indices.cpu().numpy().reshape(-1)
        if flat.size and flat.max() >= embeddings.shape[0]:
            raise IndexError(f"sentence id {int(flat.max())} is out of range for {embeddings.shape[0]} embeddings")
        # Read each needed row once (contexts of neighbouring targets overlap), in sorted order
        # so a memory map is read sequentially.
        unique, inverse = np.unique(flat, return_inverse=True)
        rows = torch.from_numpy(np.asarray(embeddings[unique], dtype=np.float32))
        vectors = rows[torch.from_numpy(inverse.reshape(-1))]
        mask = mask.cpu()
    else:
        vectors = embeddings.index_select(0, indices.reshape(-1).to(embeddings.device)).float()
        mask = mask.to(embeddings.device)
    context = vectors.reshape(num_targets, context_sentences, embeddings.shape[1])
    context = context * mask.unsqueeze(-1).to(context.dtype)
    return context, mask
