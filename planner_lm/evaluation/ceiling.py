"""The ceiling probe: what the plan's content can buy a trained LM before any optimiser noise.

No training. Take a finished run whose codes carry no content (by default `fixed`), read its own
hidden states at every conditioned site over some training documents, and average them per action
of the target sentence: ``d[l, a] = mean(h_l | action a) - mean(h_l)``, the direction in which the
LM's own representation moves when the next sentence is of kind ``a``. Scoring the run again with
``alpha * d[l, oracle action]`` added at every conditioned site (on top of its own code) asks how
much knowing the true next action is worth to this LM along its own axes. ``alpha`` is swept on
validation, and only the best one is scored on the test documents, against the run as it is.

Plain torch: reads models and texts, never the Lightning modules.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from planner_lm.errors import UserError
from planner_lm.evaluation.bootstrap import relative_change_interval, resample_indices
from planner_lm.evaluation.perplexity import PerplexityResult, sliding_window_nll
from planner_lm.evaluation.scoring import TestSet, load_test_set, make_scorer
from planner_lm.evaluation.texts import test_split_text
from planner_lm.models.conditioning import ActionConditionedLM
from planner_lm.models.steering import SiteMeans, site_hooks
from planner_lm.run_folder import RunFolder


@dataclass
class CeilingConfig:
    """The ceiling probe (see `planner_lm.evaluation.ceiling`).

    Args:
        run: the trained run to steer; its own code source stays on (default `fixed`).
        alphas: steering strengths swept on validation (0 is always included: the run as it is);
            empty = no probe.
        fit_docs: training documents whose hidden states give the per-action directions.
        val_docs: validation documents the sweep is scored on (None = all of them).
    """

    run: str = "fixed"
    alphas: list[float] = field(default_factory=list)
    fit_docs: int = 300
    val_docs: int | None = None


def token_actions(cond: Tensor, test: TestSet) -> Tensor:
    """Each token's target-sentence action (-1 for padding and tokens without a sentence)."""
    rows = (cond - test.first).clamp(min=0, max=len(test.actions) - 1)
    actions = test.actions.to(cond.device)[rows]
    return torch.where(cond >= 0, actions, torch.full_like(actions, -1))


@torch.no_grad()
def action_directions(lm: ActionConditionedLM, table: Tensor | None, test: TestSet, device: torch.device,
                      precision: str, **windows: int) -> tuple[Tensor, Tensor]:
    """`SiteMeans.directions` of ``lm`` conditioned with ``table`` (its own code source) over
    ``test``'s documents: each token counts for the action of its target sentence."""
    means = SiteMeans(lm)

    own = make_scorer(lm, table, test.first, device, precision)

    def score(ids: Tensor, mask: Tensor, cond: Tensor, keep: int) -> Tensor:
        actions = token_actions(cond, test)
        means.observe(torch.where(mask.bool(), actions, torch.full_like(actions, -1)))
        return own(ids, mask, cond, keep)

    with means.collecting():
        sliding_window_nll(test.documents, score, device=device, progress="ceiling: hidden states", **windows)
    return means.directions()


@torch.no_grad()
def steered_nll(lm: ActionConditionedLM, table: Tensor | None, directions: Tensor, alpha: float, test: TestSet,
                device: torch.device, precision: str, progress: str | bool = False, **windows: int) -> PerplexityResult:
    """Score ``test`` with the run's own codes plus ``alpha * directions[slot, oracle action]`` at every site."""
    steer = directions.to(device)
    current: dict[str, Tensor] = {}

    def add(slot: int):
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            actions = current["actions"]
            shift = steer[slot][actions.clamp(min=0)] * (actions >= 0).unsqueeze(-1)
            return (args[0] + (alpha * shift).to(args[0].dtype), *args[1:])
        return hook

    own = make_scorer(lm, table, test.first, device, precision)

    def score(ids: Tensor, mask: Tensor, cond: Tensor, keep: int) -> Tensor:
        current["actions"] = token_actions(cond, test)
        return own(ids, mask, cond, keep)

    with site_hooks(lm, add) if alpha != 0 else contextlib.nullcontext():
        return sliding_window_nll(test.documents, score, device=device, progress=progress, **windows)


def sweep_alphas(alphas: Sequence[float]) -> list[float]:
    """The strengths to try: 0 (the run as it is) first, then the requested ones, no repeats."""
    if any(not np.isfinite(a) for a in alphas):
        raise UserError(f"ceiling.alphas must be finite numbers, got {list(alphas)}")
    return list(dict.fromkeys([0.0, *(float(a) for a in alphas)]))


def ceiling_probe(cfg: CeilingConfig, folder: RunFolder, lm: ActionConditionedLM, table: Tensor | None,
                  tokenizer: Any, fingerprint: str, test: TestSet, own: PerplexityResult, device: torch.device,
                  precision: str, bootstrap_samples: int, confidence: float, seed: int,
                  **windows: int) -> dict[str, Any]:
    """Fit the directions on training documents, sweep alpha on validation, score the best on `test`
    against `own` (the run's own score on the same documents). Returns the figures for metrics.json."""
    fit = load_test_set(test_split_text(folder, "train"), tokenizer, fingerprint, cfg.fit_docs)
    val = load_test_set(test_split_text(folder, "val"), tokenizer, fingerprint, cfg.val_docs)
    directions, counts = action_directions(lm, table, fit, device, precision, **windows)
    sweep = {alpha: steered_nll(lm, table, directions, alpha, val, device, precision,
                                progress=f"ceiling: validation, alpha {alpha:g}", **windows)
             for alpha in sweep_alphas(cfg.alphas)}
    best = min(sweep, key=lambda alpha: sweep[alpha].mean_nll)
    steered = own if best == 0 else steered_nll(lm, table, directions, best, test, device, precision,
                                                progress=f"ceiling: test, alpha {best:g}", **windows)
    indices = resample_indices(len(test.documents), bootstrap_samples, seed)
    delta = relative_change_interval(steered.doc_nll, own.doc_nll, own.doc_tokens, indices, confidence)
    return {
        "run": cfg.run,
        "fit_docs": len(fit.documents), "fit_tokens": int(counts.sum()),
        "actions_seen": int((counts > 0).sum()),
        "val_ppl": {f"{alpha:g}": result.ppl for alpha, result in sweep.items()},
        "best_alpha": best,
        "test_ppl": steered.ppl, "own_test_ppl": own.ppl,
        "delta": delta.as_dict(),
    }


def ceiling_markdown(probe: dict[str, Any] | None) -> str:
    """The probe's section of results.md (empty without a probe)."""
    if not probe:
        return ""
    delta = probe["delta"]
    sweep = ", ".join(f"α {alpha}: {ppl:.3f}" for alpha, ppl in probe["val_ppl"].items())
    return (f"\n## Ceiling probe (no training)\n\nThe `{probe['run']}` run, its own code kept, plus α × the mean "
            f"difference of its own hidden states for the true next action at every conditioned layer (fitted on "
            f"{probe['fit_docs']} training documents, {probe['fit_tokens']:,} tokens, {probe['actions_seen']} "
            f"actions seen). Validation PPL by α: {sweep}. Best α {probe['best_alpha']:g} on test: PPL "
            f"{probe['test_ppl']:.3f} against {probe['own_test_ppl']:.3f}, Δ {delta['value']:+.2%} "
            f"[{delta['low']:+.2%}, {delta['high']:+.2%}]: what knowing the next action buys this LM along its "
            "own axes, before any training.\n")
