"""The LM's own directions per action: mean hidden state at each conditioned site, by action.

Two users: the ceiling probe (`planner_lm.evaluation.ceiling`) steers a trained run along them
without training, and the residual conditioning can start from them (`fit_residual`): its adapters
then map each centred action to the direction the LM's own representation already takes for it,
instead of starting from zero. Plain torch.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from planner_lm.errors import UserError
from planner_lm.models.conditioning import ActionConditionedLM


@contextlib.contextmanager
def site_hooks(lm: ActionConditionedLM, make_hook: Callable[[int], Callable]) -> Iterator[None]:
    """`make_hook(slot)` as a forward pre-hook on every conditioned site, ahead of the run's own
    adapters (so it sees the LM's own state there), for the duration of the block."""
    handles = [site.register_forward_pre_hook(make_hook(slot), prepend=True) for slot, site in enumerate(lm.sites())]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class SiteMeans:
    """Sums of each conditioned site's input (before the run's own adapter adds its shift) by the
    action of each token's target sentence; `directions()` turns them into mean differences."""

    def __init__(self, lm: ActionConditionedLM) -> None:
        self.lm = lm
        self.sums: list[Tensor | None] = [None] * len(lm.sites())
        self.counts = torch.zeros(lm.num_actions, dtype=torch.float64)
        self._actions: Tensor | None = None

    def observe(self, token_actions: Tensor) -> None:
        """The next forward pass's per-token actions ``[B, T]`` (-1: not counted, e.g. padding)."""
        self._actions = token_actions
        seen = token_actions[token_actions >= 0].cpu()
        self.counts.index_add_(0, seen, torch.ones(len(seen), dtype=torch.float64))

    def _hook(self, slot: int):
        def collect(module: nn.Module, args: tuple[Any, ...]) -> None:
            actions = self._actions
            keep = actions >= 0
            if self.sums[slot] is None:
                self.sums[slot] = torch.zeros(self.lm.num_actions, args[0].shape[-1], dtype=torch.float64,
                                              device=args[0].device)
            self.sums[slot].index_add_(0, actions[keep], args[0].detach()[keep].to(torch.float64))
        return collect

    def collecting(self) -> contextlib.AbstractContextManager:
        """Hooks on every site, ahead of the run's own adapters, for the block's forward passes."""
        return site_hooks(self.lm, self._hook)

    def directions(self) -> tuple[Tensor, Tensor]:
        """``[slots, K, width]`` per-action mean minus the overall mean (zero for unseen actions), and
        the tokens counted per action ``[K]``."""
        if self.counts.sum() == 0 or any(s is None for s in self.sums):
            raise UserError("no token was counted for the per-action hidden-state directions; give more documents")
        stacked = torch.stack([s.cpu() for s in self.sums])
        overall = stacked.sum(dim=1, keepdim=True) / self.counts.sum()
        means = stacked / self.counts.clamp(min=1).view(1, -1, 1)
        seen = self.counts.view(1, -1, 1) > 0
        return torch.where(seen, means - overall, torch.zeros_like(means)).float(), self.counts


@torch.no_grad()
def fit_residual(lm: ActionConditionedLM, directions: Tensor, counts: Tensor, scale: float) -> None:
    """Set a residual conditioning's adapters so that each seen action gives ``scale`` x its direction:
    an affine least-squares fit over the actions (weights and bias together, since the centred
    embeddings of all k actions are linearly dependent), exact while the seen actions are no more than
    the adapter's input width + 1. The low-rank projection, when there is one, is left as it is."""
    if lm.settings.conditioning != "residual":
        raise UserError("a hidden-state initialisation needs conditioning residual")
    seen = counts > 0
    for slot, adapter in enumerate(lm.adapters):
        book = lm.layer_codebook(slot).detach().float().cpu()
        centred = book - lm.code_centre[slot if lm.settings.per_layer_codebook else 0].float().cpu()
        if lm.code_projection is not None:
            centred = centred @ lm.code_projection.weight.detach().float().cpu().T
        inputs = torch.cat([centred[seen], torch.ones(int(seen.sum()), 1)], dim=1).double()
        solution = torch.linalg.lstsq(inputs, scale * directions[slot][seen].double(),
                                      driver="gelsd").solution  # [input + 1, width]: weights, then the bias
        device, dtype = adapter.weight.device, adapter.weight.dtype
        adapter.weight.copy_(solution[:-1].T.to(device=device, dtype=dtype))
        adapter.bias.copy_(solution[-1].to(device=device, dtype=dtype))
