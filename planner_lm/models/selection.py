"""How the language model sees the plan: mixture weights over the K writing actions.

Every way of turning planner output (or a control) into the action the LM is conditioned on is a
*selection mode*. All of them produce weights ``w[..., K]`` and the action embedding is then
``w @ codebook``; keeping the modes in one function means every baseline is trained by exactly the
same code path, so comparisons between them are fair.

| mode             | weights                                            | gradient to logits |
|------------------|----------------------------------------------------|--------------------|
| soft             | softmax(logits / T)  (the paper's method)          | yes                |
| pred             | softmax(logits / T) of the frozen pretrained planner | no (planner frozen) |
| hard             | one_hot(argmax logits)                             | no                 |
| straight_through | forward one_hot(argmax), backward softmax(l / T)   | yes (biased)       |
| gumbel           | softmax((logits + s*g) / T) in training, soft eval | yes                |
| oracle           | one_hot(k-means id of the true sentence)           | no planner         |
| fixed            | one_hot(action 0) everywhere                       | no planner         |
| boundary         | one_hot(sentence index in its document mod 2)      | no planner         |
| position         | one_hot(min(sentence index, cap)), cap = min(15, K-1) | no planner      |
| uniform          | 1 / K everywhere (the mean codebook vector)        | no planner         |
| none             | ``None``: no conditioning, the plain LM            | no planner         |

``boundary`` is the control for *where* sentences start: per-sentence codes tell the LM that the
next token opens a new sentence (a boundary the splitter drew by looking ahead), which fixed,
uniform and none do not. It alternates between actions 0 and 1 at every sentence start and says
nothing about content, so "planner vs boundary" is the gain from content alone.

``position`` knows only *where* in its document a sentence is: its index, capped at
:data:`POSITION_CAP` (and at ``K - 1``), so the first 15 sentences each get their own action
(0..14) and every later one shares action 15. A plan also tells the LM how far into the document it
is (first sentences look alike); "planner vs position" separates that from *what comes next*. The
cap keeps the code a control (long documents would otherwise hand out every action) and still
covers every sentence of the demo's leads (median 3, at most 14); in long documents (sotu) every
sentence from the 16th on shares action 15.

``pred`` is the reference's "PRED" stage: the LM learns to read the frozen pretrained planner's
predictions (here its soft weights) before joint training; a soft run can start from its LM
(``--data.init_from pred``, the authors' default warm start).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

@dataclass(frozen=True)
class SelectionRole:
    """What a selection mode means outside training: the one table every module reads.

    Attributes:
        uses_planner: reads planner logits.
        planner_gradient: the LM loss reaches the planner through it.
        eval_source: the code source a run trained with this mode is scored with (its headline
            row in the evaluation table; see :data:`CODE_SOURCES`).
        generation: how such a run is conditioned while generating (see
            :data:`GENERATION_SELECTIONS`): oracle codes do not exist for new text, so an oracle
            run follows the planner's argmax.
    """

    uses_planner: bool
    planner_gradient: bool
    eval_source: str
    generation: str


SELECTION_ROLES: dict[str, SelectionRole] = {
    "soft": SelectionRole(True, True, "planner_soft", "soft"),
    "pred": SelectionRole(True, False, "planner_soft", "soft"),
    "hard": SelectionRole(True, False, "planner_hard", "hard"),
    "straight_through": SelectionRole(True, True, "planner_hard", "hard"),
    "gumbel": SelectionRole(True, True, "planner_soft", "soft"),
    "oracle": SelectionRole(False, False, "oracle", "hard"),
    "fixed": SelectionRole(False, False, "fixed", "fixed"),
    "boundary": SelectionRole(False, False, "boundary", "boundary"),
    "position": SelectionRole(False, False, "position", "position"),
    "uniform": SelectionRole(False, False, "uniform", "uniform"),
    "none": SelectionRole(False, False, "none", "none"),
}
"""Every selection mode, in the order they are documented, and its role."""

SELECTIONS: tuple[str, ...] = tuple(SELECTION_ROLES)
PLANNER_SELECTIONS: tuple[str, ...] = tuple(m for m, r in SELECTION_ROLES.items() if r.uses_planner)
"""Modes that read planner logits (the others ignore the planner)."""
GRADIENT_SELECTIONS: tuple[str, ...] = tuple(m for m, r in SELECTION_ROLES.items() if r.planner_gradient)
"""Modes through which the LM loss reaches the planner."""

RUN_ORDER: tuple[str, ...] = ("soft", "pred", "gumbel", "straight_through", "hard", "oracle", "position", "boundary",
                              "uniform", "fixed", "none")
"""Order of the runs in tables: the method, its planner variants, then the controls."""

POSITION_CAP = 15
"""Largest sentence index the ``position`` control tells apart (also capped at ``K - 1``)."""

OTHER_DOC_SOURCE = "planner_soft_other_doc"
"""The content control of a soft-conditioned run: the planner's soft weights computed from the context
sentences of another test document of similar length (a seeded derangement, never the document nor its
corpus neighbour), taken at the same relative position, so the codes keep their form and their mix but
no longer describe this document (`evaluation/planner_metrics.other_document_partners`)."""

CODE_SOURCES: tuple[str, ...] = ("planner_soft", "planner_hard", OTHER_DOC_SOURCE, "oracle", "fixed", "boundary",
                                 "position", "uniform", "none")
"""What a trained conditioned LM can be given at evaluation time (any run with any source; the
other-document control only for runs scored with planner_soft)."""

GENERATION_SELECTIONS: tuple[str, ...] = ("soft", "hard", "fixed", "boundary", "position", "uniform", "none")
"""What the LM can be conditioned on while generating (oracle needs the true text)."""


def eval_source(mode: str) -> str:
    """The code source a run trained with `mode` is scored with (planner_soft for unknown modes)."""
    role = SELECTION_ROLES.get(mode)
    return role.eval_source if role else "planner_soft"


def generation_selection(mode: str) -> str:
    """How a run trained with `mode` is conditioned while generating (soft for unknown modes)."""
    role = SELECTION_ROLES.get(mode)
    return role.generation if role else "soft"


def check_selection(mode: str) -> str:
    """Return ``mode`` if it is a known selection, else raise ``ValueError`` listing them."""
    if mode not in SELECTIONS:
        raise ValueError(f"unknown selection {mode!r}; choose one of: {', '.join(SELECTIONS)}")
    return mode


def select_weights(
    logits: Tensor | None,
    mode: str,
    *,
    temperature: float = 1.0,
    training: bool = False,
    oracle_actions: Tensor | None = None,
    sentence_index: Tensor | None = None,
    num_actions: int | None = None,
    gumbel_scale: float = 1.0,
    batch_shape: Sequence[int] | None = None,
) -> Tensor | None:
    """Mixture weights ``[..., K]`` over the actions for one selection ``mode``.

    Args:
        logits: planner scores ``[..., K]``; required by the planner modes, and otherwise only
            used for its shape, dtype and device.
        mode: one of :data:`SELECTIONS`.
        temperature: softmax temperature ``T`` (soft, straight_through, gumbel).
        training: Gumbel noise is only added in training; evaluation uses the plain softmax.
        oracle_actions: true action ids ``[...]`` (mode ``oracle``); a negative id (padding)
            gives an all-zero row, i.e. no conditioning at that position.
        sentence_index: position of each sentence in its document ``[...]`` (0 = first;
            modes ``boundary`` and ``position``).
        num_actions: ``K`` when no logits are given.
        gumbel_scale: multiplier of the Gumbel noise.
        batch_shape: the ``[...]`` shape for ``fixed``/``uniform`` when neither logits nor
            oracle actions are given.

    Returns:
        weights ``[..., K]`` (float), or ``None`` for mode ``none``.
    """
    check_selection(mode)
    if mode == "none":
        return None
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if mode in PLANNER_SELECTIONS:
        if logits is None:
            raise ValueError(f"selection {mode!r} needs planner logits")
        return _planner_weights(logits, mode, temperature, training, gumbel_scale)

    k = num_actions if num_actions is not None else (logits.shape[-1] if logits is not None else None)
    if k is None:
        raise ValueError(f"selection {mode!r} needs num_actions (or logits to read K from)")
    dtype = logits.dtype if logits is not None and logits.is_floating_point() else torch.float32
    if mode == "oracle":
        if oracle_actions is None:
            raise ValueError("selection 'oracle' needs oracle_actions (the k-means ids)")
        valid = oracle_actions >= 0
        onehot = F.one_hot(oracle_actions.clamp(min=0).long(), k).to(dtype)
        return onehot * valid.unsqueeze(-1).to(dtype)

    if mode == "boundary":
        if sentence_index is None:
            raise ValueError("selection 'boundary' needs sentence_index (each sentence's position in its document)")
        if k < 2:
            raise ValueError("selection 'boundary' needs at least 2 actions")
        return F.one_hot(sentence_index.long().remainder(2), k).to(dtype)
    if mode == "position":
        if sentence_index is None:
            raise ValueError("selection 'position' needs sentence_index (each sentence's position in its document)")
        return F.one_hot(sentence_index.long().clamp(min=0, max=min(POSITION_CAP, k - 1)), k).to(dtype)

    shape, device = _reference_shape(logits, oracle_actions, batch_shape, mode)
    if mode == "fixed":
        weights = torch.zeros(*shape, k, dtype=dtype, device=device)
        weights[..., 0] = 1.0
        return weights
    # uniform
    return torch.full((*shape, k), 1.0 / k, dtype=dtype, device=device)


def action_embeddings(weights: Tensor, codebook: Tensor) -> Tensor:
    """Action vectors ``weights @ codebook``: ``[..., K] x [K, D] -> [..., D]``."""
    return weights.to(codebook.dtype) @ codebook


def _planner_weights(
    logits: Tensor, mode: str, temperature: float, training: bool, gumbel_scale: float
) -> Tensor:
    scaled = logits.float() / temperature
    if mode == "pred":  # a frozen planner's predictions: the LM loss never reaches it
        return torch.softmax(scaled.detach(), dim=-1)
    if mode == "soft" or (mode == "gumbel" and not training):
        return torch.softmax(scaled, dim=-1)
    if mode == "gumbel":
        noise = -torch.empty_like(scaled).exponential_().log()  # Gumbel(0, 1)
        return torch.softmax(scaled + gumbel_scale * noise / temperature, dim=-1)
    hard = F.one_hot(scaled.argmax(dim=-1), scaled.shape[-1]).to(scaled.dtype)
    if mode == "hard":
        return hard
    # straight_through: the value of the hard choice, the gradient of the softmax
    soft = torch.softmax(scaled, dim=-1)
    return hard + soft - soft.detach()


def _reference_shape(
    logits: Tensor | None,
    oracle_actions: Tensor | None,
    batch_shape: Sequence[int] | None,
    mode: str,
) -> tuple[tuple[int, ...], torch.device | None]:
    if logits is not None:
        return tuple(logits.shape[:-1]), logits.device
    if oracle_actions is not None:
        return tuple(oracle_actions.shape), oracle_actions.device
    if batch_shape is not None:
        return tuple(batch_shape), None
    raise ValueError(f"selection {mode!r} needs logits, oracle_actions or batch_shape for its shape")
