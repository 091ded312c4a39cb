"""Planner quality on held-out sentences: logits over cached contexts, accuracy and rank.

Same definitions as training (``planner_lm.lit.planner``): top-k accuracy, mean rank of the true
action (1 = ranked first) and NLL, here as plain numbers for the evaluation report; and the
accuracies of predictors that ignore sentence content (majority, copy the previous action, action
bigram), the bar a planner has to clear.
"""

from __future__ import annotations

from collections.abc import Sequence

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


OTHER_DOC_BUCKET = 8
"""Documents per length bucket of the other-document control's derangement (at least; up to twice)."""


def other_document_partners(lengths: Sequence[int], seed: int, bucket: int = OTHER_DOC_BUCKET) -> np.ndarray:
    """For each document (scoring order), the document whose plan it gets in the content control.

    A seeded derangement among documents of similar length: documents ordered by sentence count
    (ties in a seeded random order) are cut into consecutive buckets of ``bucket`` to
    ``2 * bucket - 1``; each bucket is a random permutation, drawn again until no document gets
    itself or a corpus neighbour (index ± 1). Why: the next document in split order is often the same
    author's next text (sotu: the same president a year later), and similar lengths keep relative
    positions comparable. A bucket where none exists (3 documents or fewer) gets a random cycle,
    which may pair neighbours; a document is its own partner only when it is the only one.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    partners = np.arange(len(lengths))
    if len(lengths) < 2:
        return partners
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.permutation(len(lengths)), lengths))
    for members in np.array_split(order, max(1, len(lengths) // bucket)):
        for _ in range(1000):  # a random permutation qualifies with probability about e^-3
            drawn = rng.permutation(members)
            if np.all(np.abs(drawn - members) > 1):
                partners[members] = drawn
                break
        else:  # none exists: one random cycle, a derangement that may pair neighbours
            cycle = rng.permutation(members)
            partners[cycle] = np.roll(cycle, -1)
    return partners


def other_document_targets(sentence_ids: Tensor, doc_first_sentence: Tensor, partners: Sequence[int] | Tensor
                           ) -> tuple[Tensor, Tensor]:
    """For each target sentence, the sentence at the same relative position of its partner document
    (`other_document_partners`): ``(ids, doc_first)`` whose contexts are the partner's sentences.

    Sentence ``i`` of a document of ``n`` sentences takes the partner's sentence ``i * m // n`` (``m``
    its count): a shorter partner's plan is stretched, a longer one's thinned, never padded with its
    last code. First sentences map to first sentences: the planner sees no context in either, so
    their codes are the same and say nothing about either document.
    """
    firsts, counts = torch.unique_consecutive(doc_first_sentence, return_counts=True)
    partners = torch.as_tensor(np.asarray(partners), dtype=torch.long)
    if len(partners) != len(firsts):
        raise ValueError(f"{len(partners)} partners for {len(firsts)} documents")
    doc = torch.repeat_interleave(torch.arange(len(firsts)), counts)
    other = partners[doc]
    position = sentence_ids - doc_first_sentence
    return firsts[other] + position * counts[other] // counts[doc], firsts[other]


def other_document_logits(planner: torch.nn.Module, embeddings: np.ndarray | Tensor, sentence_ids: Tensor,
                          doc_first_sentence: Tensor, partners: Sequence[int] | Tensor,
                          device: torch.device | str = "cpu") -> Tensor:
    """Planner logits ``[M, K]`` from the partner documents' contexts (`other_document_targets`)."""
    ids, firsts = other_document_targets(sentence_ids, doc_first_sentence, partners)
    return planner_logits(planner, embeddings, ids, firsts, device=device)


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


def previous_actions(actions: np.ndarray, ids: np.ndarray, doc_first: np.ndarray, at_start: int) -> np.ndarray:
    """The action of each sentence's previous sentence ("copy" prediction), `at_start` for the
    first sentence of a document (which has none)."""
    return np.where(ids > doc_first[ids], np.asarray(actions)[np.maximum(ids - 1, 0)], at_start)


def action_baselines(actions: np.ndarray, train_ids: np.ndarray, val_ids: np.ndarray, doc_first: np.ndarray,
                     num_actions: int) -> dict[str, float]:
    """Accuracies of predictors that ignore the sentence content, on the validation targets.

    - `majority`: always the most frequent training action (top-5: the 5 most frequent);
    - `previous`: the action of the previous sentence (the majority action at a document start);
    - `bigram`: the most frequent next action after the previous sentence's action in training
      (top-5: the 5 most frequent), a first-order Markov model over actions.
    """
    actions = np.asarray(actions, dtype=np.int64)
    top = min(5, num_actions)
    counts = np.bincount(actions[train_ids], minlength=num_actions)
    ranked = np.argsort(-counts, kind="stable")
    target = actions[val_ids]
    prev = previous_actions(actions, val_ids, doc_first, ranked[0])

    # transition counts on train (row = previous action, num_actions = "document start")
    train_prev = previous_actions(actions, train_ids, doc_first, num_actions)
    transitions = np.zeros((num_actions + 1, num_actions), dtype=np.int64)
    np.add.at(transitions, (train_prev, actions[train_ids]), 1)
    empty_rows = transitions.sum(1) == 0  # previous actions never seen in training
    transitions[empty_rows] = counts
    # ties broken by global frequency, then by id: rank by (count, global count)
    order_key = transitions.astype(np.float64) + counts[None, :] / (counts.sum() + 1.0)
    bigram_ranked = np.argsort(-order_key, axis=1, kind="stable")[:, :top]
    val_prev_row = previous_actions(actions, val_ids, doc_first, num_actions)
    bigram_top = bigram_ranked[val_prev_row]

    def mean(x: np.ndarray) -> float:
        return float(x.mean()) if len(x) else float("nan")

    return {
        "majority_top1": mean(target == ranked[0]),
        f"majority_top{top}": mean(np.isin(target, ranked[:top])),
        "previous_top1": mean(target == prev),
        "bigram_top1": mean(target == bigram_top[:, 0]),
        f"bigram_top{top}": mean((bigram_top == target[:, None]).any(1)),
    }
