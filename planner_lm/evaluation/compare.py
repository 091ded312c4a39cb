"""Tables across several evaluated run directories (a run and its variants or its other seeds).

`make quality-forgetting` trains the soft run again with each anti-forgetting remedy in its own
variant directory; each variant's `5_eval` scores it against the same `fixed` run. The comparison
table puts those soft rows side by side: what the remedy changed in the joint settings, test
perplexity and Δ vs fixed with their CIs, and planner accuracy before joint training (the
pretrained planner) and after it.

`make demo SEEDS=3` trains the planner and every joint run again with other seeds; the verdict
table (`--verdicts`) reads each seed's evaluation and says, for each question the demo answers,
each seed's figure with its CI, their mean and spread, and whether every seed gives one verdict.
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
from planner_lm.ownership import check_owned_text, write_owned_text

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


VERDICT_CHANGES = (("oracle", "oracle", "fixed"), ("soft vs fixed", "soft", "fixed"), ("soft vs boundary", "soft", "boundary"))
"""(question, run, control): the paired PPL changes whose sign is the demo's verdict."""
COPY_LEAD_BAR = 0.03
"""The planner must beat copying the previous sentence's action by this much top-1 to count as better."""


def _change_verdict(change: Interval | None) -> str:
    if change is None:
        return "missing"
    if change.high < 0:
        return "helps"
    return "hurts" if change.low > 0 else "no difference"


def verdict_rows(run_dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """One row per question: each run directory's figure (and CI), mean, spread and one verdict or 'flips'.

    The questions: oracle, soft vs fixed and soft vs boundary (paired relative PPL change of the
    run scored with its own codes; a verdict needs its CI to exclude 0), and the pretrained
    planner's top-1 lead over copying the previous sentence's action (better only by at least
    `COPY_LEAD_BAR`). A directory without an evaluation (e.g. only its planner retrained, where
    joint runs are too slow) answers the planner question from its planner stage and leaves the
    others out.
    """
    folders = [RunFolder(d) for d in run_dirs]
    paths = [f.dir("evaluate") / "metrics.json" for f in folders]
    evaluations = [_read_json(p) if p.is_file() else None for p in paths]
    if not any(evaluations):
        _read_json(paths[0])  # raises: says which evaluation to run
    rows = []
    for question, run, control in VERDICT_CHANGES:
        cells = []
        for metrics in evaluations:
            row = next((r for r in metrics["rows"] if r["run"] == run and r.get("matched")), None) if metrics else None
            cells.append(_interval(row.get(f"vs_{control}")) if row else None)
        rows.append(_verdict_row(f"{question} vs {control}" if question == run else question, cells,
                                 [_change_verdict(c) for c in cells], "{:+.2%}"))
    leads = []
    for folder, metrics in zip(folders, evaluations):
        top1, previous = (metrics.get("planner", {}).get("pretrained", {}).get("top1"),
                          metrics.get("planner_baselines", {}).get("previous_top1")) if metrics else planner_lead(folder)
        leads.append(None if top1 is None or previous is None else Interval(top1 - previous, top1 - previous,
                                                                             top1 - previous))
    verdicts = ["missing" if c is None else ("better" if c.value >= COPY_LEAD_BAR else
                                             f"under {COPY_LEAD_BAR:.0%} points") for c in leads]
    rows.append(_verdict_row("planner top-1 lead over copying", leads, verdicts, "{:+.1%}"))
    return rows


def planner_lead(folder: RunFolder) -> tuple[float | None, float | None]:
    """(top-1 of the pretrained planner, top-1 of copying the previous action) on the test split,
    computed as the evaluate stage does, for a folder with a planner but no evaluation."""
    from planner_lm.evaluation.planner_metrics import planner_logits, planner_scores
    from planner_lm.evaluation.scoring import scored_sentences
    from planner_lm.evaluation.texts import test_split_text
    from planner_lm.models.planner import Planner
    from planner_lm.run_folder import PLANNER_DIR

    pretrained = folder.pretrained_planner()
    if pretrained is None:
        return None, None
    text = test_split_text(folder)
    ids, doc_first, actions = scored_sentences(text)  # no tokenizer: the planner reads sentence vectors only
    planner = Planner.from_pretrained(pretrained.dir / PLANNER_DIR)
    top1 = planner_scores(planner_logits(planner, text.embeddings, ids, doc_first), actions)["top1"]
    return top1, text.content_free_baselines(folder, ids.numpy())["previous_top1"]


def _verdict_row(question: str, cells: list[Interval | None], verdicts: list[str], fmt: str) -> dict[str, Any]:
    values = [c.value for c in cells if c is not None]
    shown = [("–" if c is None else fmt.format(c.value) + ("" if c.low == c.high else
                                                          f" [{fmt.format(c.low)}, {fmt.format(c.high)}]"))
             for c in cells]
    measured = [v for v in verdicts if v != "missing"]
    if not measured:
        verdict = "missing"
    else:
        verdict = measured[0] if len(set(measured)) == 1 else "flips: " + ", ".join(measured)
        if len(measured) < len(verdicts):
            verdict += f" ({len(measured)} of {len(verdicts)} measured)"
    return {"question": question, "cells": shown, "verdicts": verdicts,
            "mean": fmt.format(sum(values) / len(values)) if values else "–",
            "spread": fmt.format(max(values) - min(values)).lstrip("+") if len(values) > 1 else "–",
            "verdict": verdict}


def verdict_table(run_dirs: Sequence[Path], labels: Sequence[str] | None = None) -> str:
    """Markdown: one row per question, one column per run directory (e.g. per seed or precision)."""
    labels = list(labels or [Path(d).name for d in run_dirs])
    lines = ["| question | " + " | ".join(labels) + " | mean | spread | verdict |",
             "|---|" + "---|" * (len(labels) + 3)]
    for row in verdict_rows(run_dirs):
        lines.append(f"| {row['question']} | " + " | ".join(row["cells"]) + f" | {row['mean']} | {row['spread']} "
                     f"| {row['verdict']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Compare one selection's evaluated run across run directories (e.g. a run and "
                    "its anti-forgetting variants): PPL, Δ vs fixed, planner top-1 before/after.")
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories, each evaluated (`make evaluate RUN=...`)")
    parser.add_argument("--selection", default="soft", help="which joint run of each directory (default: soft)")
    parser.add_argument("--output", type=Path, default=None,
                        help="also write the table to this markdown file (a new one, or one compare wrote and "
                             "nobody edited since: anything else is refused)")
    parser.add_argument("--verdicts", action="store_true",
                        help="instead: each question the demo answers (oracle, soft vs fixed, soft vs boundary, "
                             "planner vs copying), one column per run directory, and whether they agree")
    parser.add_argument("--labels", nargs="+", default=None, help="column labels for --verdicts (default: folder names)")
    args = parser.parse_args(argv)
    try:
        if args.labels is not None and len(args.labels) != len(args.run_dirs):
            raise UserError(f"--labels names {len(args.labels)} columns for {len(args.run_dirs)} run directories")
        if args.output is not None:
            check_owned_text(args.output)  # before the work: a user's file there is refused untouched
        table = (verdict_table(args.run_dirs, args.labels) if args.verdicts
                 else comparison_table(args.run_dirs, args.selection))
        print(table)
        if args.output is not None:
            write_owned_text(args.output, table + "\n", "compare")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
