"""One table across several evaluated run directories (a run and its variants).

`make quality-forgetting` trains the soft run again with each anti-forgetting remedy in its own
variant directory; each variant's `5_eval` scores it against the same `fixed` run. This module
reads those finished evaluations and puts the soft rows side by side: what the remedy changed
in the joint settings, test perplexity and Δ vs fixed with their CIs, and planner accuracy before
joint training (the pretrained planner) and after it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from planner_lm.run_folder import RunFolder
from planner_lm.errors import UserError
from planner_lm.evaluation.bootstrap import Interval
from planner_lm.evaluation.report import Column, results_markdown

REMEDY_KEYS = ("model.planner_unfreeze_at", "model.planner_loss_weight")
"""The finetune-joint settings that guard the planner against forgetting."""

COLUMNS = [
    Column("unfreeze_at", "planner_unfreeze_at", fmt="{:g}"),
    Column("loss_weight", "planner_loss_weight", fmt="{:g}"),
    Column("ppl", "test PPL [95 % CI]", better="lower", show_interval=True),
    Column("vs_fixed", "Δ vs fixed [95 % CI]", fmt="{:+.2%}", better="lower", show_interval=True,
           mark_nonzero=True),
    Column("top1_before", "planner top-1 before", fmt="{:.1%}"),
    Column("top1_after", "planner top-1 after", fmt="{:.1%}", better="higher"),
]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path} is missing: run `make evaluate RUN={path.parent.parent}` first")
    return json.loads(path.read_text())


def _interval(cell: dict[str, float] | None) -> Interval | None:
    return Interval(cell["value"], cell["low"], cell["high"]) if cell else None


def comparison_row(run_dir: Path, selection: str = "soft") -> dict[str, Any]:
    """The `selection` run of ``run_dir`` as one row: its remedy settings, PPL, Δ vs fixed, accuracies."""
    folder = RunFolder(run_dir)
    metrics = _read_json(folder.dir("evaluate") / "metrics.json")
    row = next((r for r in metrics["rows"] if r["run"] == selection and r.get("matched")), None)
    if row is None:
        raise UserError(f"{folder.dir('evaluate')} scored no '{selection}' run; train it and re-run `make evaluate`")
    config = folder.joint_run(selection).manifest.config
    planner = metrics.get("planner", {})
    return {
        "label": run_dir.name,
        "unfreeze_at": config.get(REMEDY_KEYS[0]),
        "loss_weight": config.get(REMEDY_KEYS[1]),
        "ppl": _interval(row["ppl"]),
        "vs_fixed": _interval(row.get("vs_fixed")),
        "top1_before": planner.get("pretrained", {}).get("top1"),
        "top1_after": planner.get(selection, {}).get("top1"),
    }


def comparison_table(run_dirs: Sequence[Path], selection: str = "soft") -> str:
    """Markdown: one row per run directory (its `selection` run), best value per column in bold."""
    rows = [comparison_row(Path(d), selection) for d in run_dirs]
    return results_markdown(rows, COLUMNS, label_header="run directory")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Compare one selection's evaluated run across run directories (e.g. a run and "
                    "its anti-forgetting variants): PPL, Δ vs fixed, planner top-1 before/after.")
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories, each evaluated (`make evaluate RUN=...`)")
    parser.add_argument("--selection", default="soft", help="which joint run of each directory (default: soft)")
    parser.add_argument("--output", type=Path, default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    try:
        table = comparison_table(args.run_dirs, args.selection)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(table)
    if args.output is not None:
        args.output.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
