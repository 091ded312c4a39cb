"""Learning curves: each joint run's validation perplexity by training step (`val_curve.json`,
written by finetune-joint) and its change against the `fixed` control at the same step.

Read by the evaluate stage, which adds the table to `results.md` and plots `val_curve.png`: it
shows whether a run was still improving when it stopped and when the gap to the control opened.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from planner_lm.evaluation.report import _pyplot
from planner_lm.run_folder import JointRun

REFERENCE = "fixed"
"""The control the curves are compared with, step by step (same number of updates)."""


def val_curves(runs: list[JointRun]) -> dict[str, dict[int, float]]:
    """Validation PPL by total step of every run that validated during training (`{selection: {step:
    ppl}}`): a warm-started run's steps count from its source's initialisation (`JointRun.total_steps`),
    so a column compares runs after the same number of updates."""
    curves = {}
    for run in runs:
        total, own = run.total_steps, run.steps
        offset = total - own if total is not None and own is not None else 0
        points = {int(row["step"]) + offset: float(row["val/ppl"]) for row in run.val_curve() if "val/ppl" in row}
        if points:
            curves[run.selection] = dict(sorted(points.items()))
    return curves


def curve_markdown(curves: dict[str, dict[int, float]], reference: str = REFERENCE) -> str:
    """Steps as rows, runs as columns: validation PPL and, beside it, the relative change against
    `reference` at the same step (negative = better); empty when no run has two points."""
    if not any(len(points) > 1 for points in curves.values()):
        return ""
    steps = sorted({step for points in curves.values() for step in points})
    ref = curves.get(reference, {})
    lines = ["", f"Validation PPL by total training step, counted from each run's initialisation (a warm start "
             f"includes its source's steps; Δ vs {reference} at the same total step):", "",
             "| total step | " + " | ".join(curves) + " |", "|---|" + "---|" * len(curves)]
    for step in steps:
        cells = []
        for name, points in curves.items():
            if step not in points:
                cells.append("–")
            elif name != reference and step in ref:
                cells.append(f"{points[step]:.2f} ({points[step] / ref[step] - 1:+.2%})")
            else:
                cells.append(f"{points[step]:.2f}")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(curves: dict[str, dict[int, float]], path: Path, reference: str = REFERENCE) -> Any:
    """Validation PPL by step (top) and the change against `reference` (bottom, when it ran); the figure."""
    plt = _pyplot()
    ref = curves.get(reference, {})
    panels = 2 if ref else 1
    fig, axes = plt.subplots(panels, 1, figsize=(7, 3.2 * panels + 0.6), sharex=True, squeeze=False)
    for name, points in curves.items():
        axes[0, 0].plot(list(points), list(points.values()), marker=".", label=name)
        shared = [s for s in points if s in ref]
        if panels == 2 and name != reference and shared:
            axes[1, 0].plot(shared, [100 * (points[s] / ref[s] - 1) for s in shared], marker=".", label=name)
    axes[0, 0].set_ylabel("validation PPL")
    axes[0, 0].legend(fontsize=8)
    axes[0, 0].grid(alpha=0.3)
    if panels == 2:
        axes[1, 0].axhline(0, color="gray", lw=0.8)
        axes[1, 0].set_ylabel(f"Δ vs {reference} (%)")
        axes[1, 0].grid(alpha=0.3)
    axes[-1, 0].set_xlabel("total training step (from initialisation)")
    fig.suptitle("Learning curves of the joint runs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig
