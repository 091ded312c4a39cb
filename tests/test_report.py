"""Results table, plots and TensorBoard output of the evaluate stage."""

from __future__ import annotations

import numpy as np

from planner_lm.evaluation.bootstrap import Interval
from planner_lm.evaluation.report import (
    Column,
    log_to_tensorboard,
    plot_nll_by_position,
    plot_ppl_intervals,
    results_markdown,
)

COLUMNS = [
    Column("ppl", "PPL", better="lower", show_interval=True),
    Column("top1", "top-1", fmt="{:.1%}", better="higher"),
    Column("note", "note"),
]


def test_table_marks_the_best_value_of_each_column_in_bold():
    rows = [
        {"label": "soft", "ppl": Interval(20.0, 19.0, 21.0), "top1": 0.30, "note": "ours"},
        {"label": "none", "ppl": Interval(25.0, 24.0, 26.5), "top1": None},
        {"label": "oracle", "ppl": 18.5, "top1": 0.25},
    ]
    table = results_markdown(rows, COLUMNS).splitlines()
    assert table[0] == "| run | PPL | top-1 | note |"
    assert table[2] == "| soft | 20.00 [19.00, 21.00] | **30.0%** | ours |"
    assert table[3] == "| none | 25.00 [24.00, 26.50] | – | – |"
    assert table[4] == "| oracle | **18.50** | 25.0% | – |"


def test_single_value_columns_are_not_bold():
    table = results_markdown([{"label": "a", "ppl": 3.0}], COLUMNS[:1])
    assert "**" not in table


def test_plots_and_tensorboard(tmp_path):
    fig = plot_ppl_intervals(
        [("soft", Interval(20, 19, 21)), ("none", Interval(25, 24, 26))], tmp_path / "ppl.png"
    )
    curve = plot_nll_by_position({"soft": np.array([5.0, 3.0, np.nan, 2.0]), "none": np.array([5.5, 3.1, 2.0, 2.0])},
                                 tmp_path / "pos.png", reference="none")
    assert len(curve.axes) == 2
    assert (tmp_path / "ppl.png").stat().st_size > 1000
    assert (tmp_path / "pos.png").stat().st_size > 1000
    log_to_tensorboard(
        tmp_path / "tb", {"test/ppl": 20.0, "test/skipped": float("nan")}, {"ppl": fig, "pos": curve}
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert events.Tags()["scalars"] == ["test/ppl"]
    assert events.Scalars("test/ppl")[0].value == 20.0
    assert len(events.Tags()["images"]) == 2
