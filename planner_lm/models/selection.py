"""How the language model sees the plan: mixture weights over the K writing actions.

Every way of turning planner output (or a control) into the action the LM is conditioned on is a
*selection mode*. All of them produce weights ``w[..., K]`` and the action embedding is then
``w @ codebook``; keeping the modes in one function means every baseline is trained by exactly the
same code path, so comparisons between them are fair.

| mode             | weights                                            | gradient to logits |
|------------------|----------------------------------------------------|--------------------|
| soft             | softmax(logits / T)  (the paper's method)          | yes                |
| hard             | one_hot(argmax logits)                             | no                 |
| straight_through | forward one_hot(argmax), backward softmax(l / T)   | yes (biased)       |
| gumbel           | softmax((logits + s*g) / T) in training, soft eval | yes                |
| oracle           | one_hot(k-means id of the true sentence)           | no planner         |
| fixed            | one_hot(action 0) everywhere                       | no planner         |
| boundary         | one_hot(sentence index in its document mod 2)      | no planner         |
| uniform          | 1 / K everywhere (the mean codebook vector)        | no planner         |
| none             | ``None``: no conditioning, the plain LM            | no planner         |

``boundary`` is the control for *where* sentences start: per-sentence codes tell the LM that the
next token opens a new sentence (a boundary the splitter drew by looking ahead), which fixed,
uniform and none do not. It alternates between actions 0 and 1 at every sentence start and says
nothing about content, so "planner vs boundary" is the gain from content alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

SELECTIONS: tuple[str, ...] = (
    "soft",
    "hard",
    "straight_through",
    "gumbel",
    "oracle",
    "fixed",
    "boundary",
    "uniform",
    "none",
)
"""Every selection mode, in the order they are documented."""

PLANNER_SELECTIONS: tuple[str, ...] = ("soft", "hard", "straight_through", "gumbel")
"""Modes that read planner logits (the others ignore the planner)."""

GRADIENT_SELECTIONS: tuple[str, ...] = ("soft", "straight_through", "gumbel")
"""Modes through which the LM loss reaches the planner."""


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
            mode ``boundary``).
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
