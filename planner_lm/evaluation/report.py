"""Turn evaluation numbers into a markdown table, PNG plots and TensorBoard scalars.

Kept free of any evaluation logic: it formats what it is given, so the table and the plots of
``evaluate`` can be tested with hand-made numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from planner_lm.evaluation.bootstrap import Interval


@dataclass(frozen=True)
class Column:
    """One metric column: ``key`` in each row dict, its header, format, and which way is better."""

    key: str
    header: str
    fmt: str = "{:.2f}"
    better: Literal["lower", "higher", None] = None
    show_interval: bool = False
    mark_nonzero: bool = False  # append SIGNIFICANT_MARK when the interval excludes 0


SIGNIFICANT_MARK = " \\*"
"""Marks a change whose confidence interval excludes 0 (an escaped markdown asterisk)."""


def _value(cell: Any) -> float | None:
    if cell is None:
        return None
    value = cell.value if isinstance(cell, Interval) else cell
    if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
        return float(value)
    return None


def _format(cell: Any, column: Column) -> str:
    value = _value(cell)
    if value is None:
        return str(cell) if isinstance(cell, str) else "–"
    text = column.fmt.format(value)
    if column.show_interval and isinstance(cell, Interval):
        text += f" [{column.fmt.format(cell.low)}, {column.fmt.format(cell.high)}]"
    if column.mark_nonzero and isinstance(cell, Interval) and (cell.low > 0 or cell.high < 0):
        text += SIGNIFICANT_MARK
    return text


def results_markdown(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], label_header: str = "run"
) -> str:
    """A markdown table: one row per ``rows`` entry (its ``"label"``), best value per column bold.

    Cells may be numbers, :class:`Interval` (value shown, optionally with its interval), strings
    or missing (shown as "–"). Ties are all bold.
    """
    best: dict[str, float] = {}
    for column in columns:
        values = [v for v in (_value(row.get(column.key)) for row in rows) if v is not None]
        if column.better and len(values) > 1:
            best[column.key] = min(values) if column.better == "lower" else max(values)
    lines = [
        "| " + " | ".join([label_header] + [c.header for c in columns]) + " |",
        "|" + "---|" * (len(columns) + 1),
    ]
    for row in rows:
        cells = [str(row["label"])]
        for column in columns:
            text = _format(row.get(column.key), column)
            value = _value(row.get(column.key))
            if column.key in best and value is not None and math.isclose(value, best[column.key]):
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ppl_intervals(entries: Sequence[tuple[str, Interval]], path: Path, title: str = ""):
    """Perplexity per run as points with bootstrap 95 % error bars; returns the figure."""
    plt = _pyplot()
    values = np.array([iv.value for _, iv in entries])
    errors = np.array([[iv.value - iv.low for _, iv in entries], [iv.high - iv.value for _, iv in entries]])
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(entries) + 1.2))
    y = np.arange(len(entries))
    ax.errorbar(values, y, xerr=errors, fmt="o", color="tab:blue", capsize=3)
    ax.set_yticks(y, [label for label, _ in entries])
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlabel("test perplexity per token (95 % bootstrap CI over documents)")
    ax.set_title(title or "Perplexity by run and code source")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def plot_nll_by_position(
    curves: Mapping[str, np.ndarray], path: Path, title: str = "", reference: str | None = None
):
    """Mean NLL against token position within a sentence, one line per run; returns the figure.

    With ``reference`` (a key of ``curves``), a second panel shows each curve minus that one,
    which is where the small differences between runs become visible.
    """
    plt = _pyplot()
    panels = 2 if reference in curves else 1
    fig, axes = plt.subplots(panels, 1, figsize=(7, 3.2 * panels + 0.6), sharex=True, squeeze=False)
    for label, mean in curves.items():
        axes[0, 0].plot(np.arange(len(mean)), mean, marker=".", label=label)
        if panels == 2 and label != reference:
            axes[1, 0].plot(np.arange(len(mean)), mean - curves[reference], marker=".", label=label)
    axes[0, 0].set_ylabel("mean NLL (nats)")
    axes[0, 0].set_title(title or "Where in a sentence does the plan help?")
    axes[0, 0].legend(fontsize=7)
    if panels == 2:
        axes[1, 0].axhline(0.0, color="black", linewidth=0.8)
        axes[1, 0].set_ylabel(f"NLL − {reference}")
    axes[-1, 0].set_xlabel("token position within its sentence (last bin pools the rest)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def log_to_tensorboard(
    log_dir: Path, scalars: Mapping[str, float], figures: Mapping[str, Any] | None = None,
    text: Mapping[str, str] | None = None,
) -> None:
    """Write scalars (NaN skipped), matplotlib figures and markdown text to TensorBoard."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for name, value in scalars.items():
            if value is not None and not math.isnan(float(value)):
                writer.add_scalar(name, float(value), 0)
        for name, figure in (figures or {}).items():
            writer.add_figure(name, figure, 0, close=False)
        for name, body in (text or {}).items():
            writer.add_text(name, body, 0)
    finally:
        writer.close()
