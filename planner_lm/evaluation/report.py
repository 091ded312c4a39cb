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
    """Horizontal bars of perplexity per run with bootstrap 95 % error bars; returns the figure."""
    plt = _pyplot()
    labels = [label for label, _ in entries]
    values = np.array([iv.value for _, iv in entries])
    errors = np.array([[iv.value - iv.low for _, iv in entries], [iv.high - iv.value for _, iv in entries]])
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(entries) + 1.2))
    y = np.arange(len(entries))
    ax.barh(y, values, xerr=errors, color="tab:blue", alpha=0.7, capsize=3)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    if len(values):
        span = max(values.max() - values.min(), 1e-6)
        ax.set_xlim(max(0.0, values.min() - 2 * span), (values + errors[1]).max() + 0.5 * span)
    ax.set_xlabel("test perplexity per token (95 % bootstrap CI over documents)")
    ax.set_title(title or "Perplexity by run and code source")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def plot_nll_by_position(
    curves: Mapping[str, np.ndarray], path: Path, title: str = ""
):
    """Mean NLL against token position within a sentence, one line per run; returns the figure."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, mean in curves.items():
        positions = np.arange(len(mean))
        ax.plot(positions, mean, marker=".", label=label)
    ax.set_xlabel("token position within its sentence (last bin pools the rest)")
    ax.set_ylabel("mean NLL (nats)")
    ax.set_title(title or "Where in a sentence does the plan help?")
    ax.legend(fontsize=7)
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
