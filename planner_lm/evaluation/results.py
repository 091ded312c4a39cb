"""The evaluation report: every (run, code source) row with CIs and paired changes against the
controls, the readable table of matched rows, `results.md`, `metrics.json`, plots and TensorBoard.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from planner_lm.artifacts import atomic_write_text
from planner_lm.evaluation.bootstrap import Interval, ppl_interval, relative_change_interval, resample_indices
from planner_lm.evaluation.ceiling import ceiling_markdown
from planner_lm.evaluation.curves import curve_markdown, plot_curves, val_curves
from planner_lm.evaluation.perplexity import nll_by_position
from planner_lm.evaluation.power import power_markdown
from planner_lm.evaluation.report import (
    SIGNIFICANT_MARK,
    Column,
    log_to_tensorboard,
    plot_nll_by_position,
    plot_ppl_intervals,
    results_markdown,
)
from planner_lm.evaluation.scoring import TestSet, scored_sources
from planner_lm.models.selection import OTHER_DOC_SOURCE, eval_source
from planner_lm.run_folder import JointRun

CURVE_PLOT = "val_curve.png"  # 5_eval: validation PPL of the joint runs by training step (when they validated)
REFERENCES = ("fixed", "boundary", "none")
"""Controls every row is compared with (paired, per document): the parameter-matched constant
code, the content-free sentence-boundary code, and the plain LM."""


def _delta_column(reference: str) -> Column:
    return Column(f"vs_{reference}", f"Δ vs {reference} [95 % CI]", fmt="{:+.2%}", better="lower",
                  show_interval=True, mark_nonzero=True)


PAIRS = ("soft:pred", "soft:hard", "soft:position")
"""The default comparisons between trained runs (`run:reference`), each scored with its own codes, shown
where both runs were evaluated: the papers' own (end-to-end soft against the frozen planner's codes, pred,
the predecessor paper, and against hard selection) and the position control (a code that knows only the
sentence's index: what the plan buys beyond "where in the document")."""
PAIR_COLUMN = Column("change", "Δ [95 % CI]", fmt="{:+.2%}", show_interval=True, mark_nonzero=True)

PPL_COLUMNS = [
    Column("ppl", "test PPL [95 % CI]", better="lower", show_interval=True),
    *(_delta_column(reference) for reference in REFERENCES),
    Column("top1", "planner top-1", fmt="{:.1%}", better="higher"),
    Column("rouge2", "ROUGE-2 F", fmt="{:.3f}", better="higher"),
    Column("follow", "plan following", fmt="{:.1%}", better="higher"),
]
"""The readable table: one row per run, scored with the code source it was trained with."""


def run_protocol(runs: list[JointRun], embed: Any, num_actions: int, fingerprint: str) -> dict[str, Any]:
    """Facts of the compared runs that a reader needs to interpret the table (from their manifests)."""
    def common(key: str) -> Any:
        values = {str(r.manifest.facts.get(key)) for r in runs if r.manifest.facts.get(key) is not None}
        return values.pop() if len(values) == 1 else (", ".join(sorted(values)) if values else None)

    trained = [r for r in runs if r.manifest.facts.get("trained") and r.total_steps is not None]
    return {"base_lm": common("lm_name"), "base_mode": common("base_mode"), "tokenizer": fingerprint[:12],
            "num_actions": num_actions, "encoder": embed.fact("encoder"),
            "joint_steps": steps_description(trained), "total_steps": {r.selection: r.total_steps for r in trained}}


def steps_description(runs: list[JointRun]) -> str | None:
    """The trained runs' total steps from their initialisation: the cold starts' figures, then each
    warm start spelled out (`soft 600 = 300 on pred's 300`), so unequal budgets are never hidden."""
    cold = sorted({run.total_steps for run in runs if run.total_steps == run.steps})
    warm = [f"{run.selection} {run.total_steps} = {run.steps} on {run.manifest.facts.get('init_from')}'s "
            f"{run.total_steps - run.steps}" for run in runs if run.steps is not None and run.total_steps != run.steps]
    text = ", ".join(map(str, cold))
    return (f"{text} ({'; '.join(warm)})" if text and warm else text or "; ".join(warm)) or None


def untouched_base_result(runs: list[JointRun], results: dict) -> Any:
    """The scores of the untouched pretrained base LM, the only meaning of "Δ vs none", or None.

    That is the `none` run when it trained nothing, else any run whose base weights stayed frozen
    scored without actions (adapters off: the same model). A `none` run that fine-tuned its base
    (`base_mode: full` or `lora`), or a fine-tuned run scored without actions, is a different LM.
    """
    untouched = [run for run in runs
                 if (run.selection == "none" and run.manifest.facts.get("trained") is False)
                 or run.manifest.facts.get("base_mode") == "frozen"]
    untouched.sort(key=lambda run: run.selection != "none")  # the `none` run itself first
    return next((results[(run.selection, "none")] for run in untouched if (run.selection, "none") in results), None)


def assemble_metrics(cfg, runs, results, planner_table, baselines, structure, test, num_tokens, protocol) -> dict[str, Any]:
    """Every (run, code source) row with CIs and paired changes; the table keeps the matched rows."""
    indices = resample_indices(len(test.documents), cfg.bootstrap_samples, cfg.seed)
    references = {name: results.get((name, name)) for name in ("fixed", "boundary")}
    references["none"] = untouched_base_result(runs, results)
    rows: list[dict[str, Any]] = []
    for run in runs:
        matched = eval_source(run.selection)
        for source in [s for s in scored_sources(run.selection, cfg.code_sources) if (run.selection, s) in results]:
            result = results[(run.selection, source)]
            row: dict[str, Any] = {
                "label": f"{run.selection} · {source}",
                "run": run.selection, "source": source, "matched": source == matched,
                "ppl": ppl_interval(result.doc_nll, result.doc_tokens, indices, cfg.confidence),
                "nll": result.mean_nll, "tokens": result.num_tokens,
            }
            for name, reference in references.items():
                if reference is not None:
                    row[f"vs_{name}"] = relative_change_interval(result.doc_nll, reference.doc_nll,
                                                                 result.doc_tokens, indices, cfg.confidence)
            if source == matched:
                row["by_length"] = ppl_by_length(result, [len(spans) for spans in test.spans])
                planner_name = run.selection if run.selection in planner_table else None
                if planner_name:
                    row.update({k: planner_table[planner_name][k] for k in ("top1", "top5", "mean_rank")})
                row.update({k: v for k, v in structure.get(run.selection, {}).items()})
            rows.append(row)
    pairs = paired_changes(PAIRS if cfg.pairs is None else cfg.pairs, results, indices, cfg.confidence)
    controls = content_controls(runs, results, indices, cfg.confidence)
    if "pretrained" in planner_table:
        rows.append({"label": "pretrained planner", "run": "pretrained", "source": "-", "matched": False,
                     **{k: planner_table["pretrained"][k] for k in ("top1", "top5", "mean_rank")}})
    # the table: each run with its own code source, the soft runs' other-document control, the pretrained planner
    shown = [row for row in rows if row["matched"] or row["run"] == "pretrained" or row["source"] == OTHER_DOC_SOURCE]
    columns = [c for c in PPL_COLUMNS if any(row.get(c.key) is not None for row in shown)]  # e.g. no `none` run
    table = results_markdown(shown, columns, label_header="run · code source")
    as_json = [{k: (v.as_dict() if isinstance(v, Interval) else v) for k, v in row.items()} for row in rows]
    return {
        "rows": as_json,
        "table": table,
        "pairs": [{**pair, "change": pair["change"].as_dict()} for pair in pairs],
        "content_controls": [{**control, "change": control["change"].as_dict()} for control in controls],
        "planner": planner_table,
        "planner_baselines": baselines,
        "structure": structure,
        "protocol": {**protocol, "window": cfg.window, "stride": cfg.stride, "precision": cfg.precision,
                     "test_docs": len(test.documents), "test_tokens": num_tokens,
                     "bootstrap_samples": cfg.bootstrap_samples, "confidence": cfg.confidence},
    }


def paired_changes(pairs: list[str], results: dict, indices: np.ndarray, confidence: float) -> list[dict[str, Any]]:
    """Paired Δ of each `run:reference` pair whose two runs were both scored with their own codes."""
    out = []
    for pair in pairs:
        run, reference = pair.split(":")
        scored = results.get((run, eval_source(run))), results.get((reference, eval_source(reference)))
        if None not in scored:
            change = relative_change_interval(scored[0].doc_nll, scored[1].doc_nll, scored[0].doc_tokens, indices,
                                              confidence)
            out.append({"label": f"{run} vs {reference}", "run": run, "reference": reference, "change": change})
    return out


def content_controls(runs: list[JointRun], results: dict, indices: np.ndarray, confidence: float
                     ) -> list[dict[str, Any]]:
    """Paired Δ of each run with its own plan against the same run given another document's plan
    (`planner_soft_other_doc`): what the plan's content buys, with its own CI rather than read off
    two CIs against fixed."""
    out = []
    for run in runs:
        own = results.get((run.selection, eval_source(run.selection)))
        other = results.get((run.selection, OTHER_DOC_SOURCE))
        if own is not None and other is not None:
            change = relative_change_interval(own.doc_nll, other.doc_nll, own.doc_tokens, indices, confidence)
            out.append({"label": f"{run.selection}: own plan vs another document's", "run": run.selection,
                        "source": eval_source(run.selection), "control": OTHER_DOC_SOURCE, "change": change})
    return out


def pairs_markdown(pairs: list[dict[str, Any]]) -> str:
    """The run-against-run comparisons as a small table (empty when none of the pairs was scored)."""
    if not pairs:
        return ""
    rows = [{**pair, "change": Interval(**pair["change"])} for pair in pairs]
    return ("\nRuns against each other, paired on the same documents, each with its own codes (negative = the "
            "first run is better):\n\n" + results_markdown(rows, [PAIR_COLUMN], label_header="run vs reference"))


def controls_markdown(controls: list[dict[str, Any]]) -> str:
    """Each run's own plan against another document's, paired (empty when no control was scored)."""
    if not controls:
        return ""
    rows = [{**control, "change": Interval(**control["change"])} for control in controls]
    return ("\nThe plan's content, paired on the same documents (the same run with its own plan against another "
            "document's; negative = its own plan is better):\n\n"
            + results_markdown(rows, [PAIR_COLUMN], label_header="run: own plan vs other"))


def precision_note(protocol: dict[str, Any], check: dict[str, Any] | None) -> str:
    """What precision the figures were computed in and, for bf16, the gap measured against fp32."""
    if protocol["precision"] != "bf16":
        return f"\nPrecision: {protocol['precision']} (fp32 figures; no bf16 gap to measure).\n"
    if check is None:
        return "\nPrecision: bf16 autocast, not checked against fp32 (precision_check_docs 0).\n"
    return (f"\nPrecision: bf16 autocast. Measured gap: `{check['run']} · {check['source']}` on the first "
            f"{check['docs']} documents ({check['tokens']} tokens) scores PPL {check['ppl_bf16']:.4f} in bf16 and "
            f"{check['ppl_fp32']:.4f} in fp32, {check['rel_diff']:+.3%}.\n")


def setting_line(protocol: dict[str, Any]) -> str:
    """The one-line description of what was compared, printed above the table."""
    return (f"Setting: base LM {protocol.get('base_lm', '?')} ({protocol.get('base_mode', '?')} base weights, "
            f"{protocol.get('joint_steps', '?')} joint steps from initialisation), tokenizer {protocol.get('tokenizer', '?')}, "
            f"k = {protocol.get('num_actions', '?')} actions from {protocol.get('encoder', '?')}; "
            f"{protocol.get('scored', 'test split')} "
            f"{protocol['test_docs']} documents, {protocol['test_tokens']} tokens, window {protocol['window']}, "
            f"stride {protocol['stride']}, precision {protocol['precision']}"
            + (f" (PPL {protocol['bf16_vs_fp32_ppl_rel_diff']:+.3%} against fp32 on a subset)"
               if "bf16_vs_fp32_ppl_rel_diff" in protocol else "") + ".")


LENGTH_BUCKETS: tuple[tuple[int, int | None], ...] = ((1, 3), (4, 10), (11, 30), (31, 100), (101, 300), (301, 1000),
                                                     (1001, None))
"""Document lengths in sentences for the PPL-by-length breakdown (None: no upper bound)."""


def ppl_by_length(result: Any, sentences_per_doc: list[int]) -> dict[str, dict[str, float]]:
    """Token-weighted PPL of the documents in each length bucket (buckets without documents left out)."""
    counts = np.asarray(sentences_per_doc)
    out = {}
    for lo, hi in LENGTH_BUCKETS:
        keep = (counts >= lo) & (counts <= (hi if hi is not None else np.inf))
        tokens = int(result.doc_tokens[keep].sum())
        if tokens:
            label = f"{lo}-{hi}" if hi is not None else f"{lo}+"
            out[label] = {"docs": int(keep.sum()), "tokens": tokens,
                          "ppl": float(math.exp(result.doc_nll[keep].sum() / tokens))}
    return out


def length_markdown(rows: list[dict[str, Any]]) -> str:
    """PPL by document length (sentences per document) for the matched rows, as a markdown table."""
    buckets = [f"{lo}-{hi}" if hi is not None else f"{lo}+" for lo, hi in LENGTH_BUCKETS]
    buckets = [b for b in buckets if any(b in (row.get("by_length") or {}) for row in rows)]
    if not buckets or not rows:
        return ""
    docs = {b: next(row["by_length"][b]["docs"] for row in rows if b in (row.get("by_length") or {})) for b in buckets}
    lines = ["", "PPL by document length (sentences per document; documents in each bucket):", "",
             "| run · code source | " + " | ".join(f"{b} ({docs[b]})" for b in buckets) + " |",
             "|---|" + "---|" * len(buckets)]
    for row in rows:
        cells = [f"{row['by_length'][b]['ppl']:.2f}" if b in (row.get("by_length") or {}) else "–" for b in buckets]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, runs: list[JointRun], results, test: TestSet, metrics: dict) -> list[str]:
    """Write results.md, metrics.json, the plots and TensorBoard; returns the plot files written."""
    matched_rows = [r for r in metrics["rows"] if "ppl" in r and r["matched"]]
    entries = [(r["label"], Interval(**r["ppl"])) for r in matched_rows]
    ppl_fig = plot_ppl_intervals(entries, out / "ppl.png")
    curves, reference = {}, None
    for run in runs:
        source = eval_source(run.selection)
        if (run.selection, source) in results:
            mean, _ = nll_by_position(results[(run.selection, source)], test.documents, max_position=32)
            curves[f"{run.selection} · {source}"] = mean
            if source == "none":
                reference = f"{run.selection} · {source}"
    position_fig = plot_nll_by_position(curves, out / "nll_by_position.png", reference=reference)
    protocol = metrics["protocol"]
    notes = (
        f"Each run is scored with the code source it was trained with (the full grid of runs × code sources "
        f"is in `metrics.json`). Windows of {protocol['window']} tokens, stride {protocol['stride']} "
        f"({'the papers’ exact protocol' if protocol['stride'] == 1 else 'stride 1 is the papers’ exact protocol'}). "
        f"{protocol['confidence']:.0%} CIs: bootstrap over documents ({protocol['bootstrap_samples']} resamples). "
        "Δ columns are paired relative PPL changes (negative = better) against three controls: `fixed` "
        "(one constant action), `boundary` (an action that only marks where each sentence starts) and "
        f"`none` (the untouched pretrained base LM, shown only when a run kept it); {SIGNIFICANT_MARK.strip()} = the CI excludes 0. Best value per column in bold.\n"
    )
    if any(r["source"] == OTHER_DOC_SOURCE for r in metrics["rows"]):
        notes += (f"\n`{OTHER_DOC_SOURCE}` rows: the same trained run, its planner fed the context sentences of "
                  "another test document of similar length (a seeded derangement within length buckets, never "
                  "the document itself nor its neighbour in corpus order; `other_document` in metrics.json) at "
                  "the same relative position: the codes keep their form but lose this document's content, so "
                  "the paired gap to the run's own row (below) is what content contributes. First sentences "
                  "get the same code in both (the planner sees no context there).\n")
    baselines = metrics["planner_baselines"]
    notes += (f"\nPlanner reference accuracies on the same test sentences (no content): majority action "
              f"{baselines['majority_top1']:.1%}, previous sentence's action {baselines['previous_top1']:.1%}, "
              f"action bigram of the training split {baselines['bigram_top1']:.1%}.\n")
    body = "# Evaluation results\n\n" + setting_line(protocol) + "\n\n" + metrics["table"] + "\n" + notes
    body += controls_markdown(metrics["content_controls"])
    body += pairs_markdown(metrics["pairs"])
    body += power_markdown(metrics.get("power"))
    body += ceiling_markdown(metrics.get("ceiling"))
    body += precision_note(protocol, metrics.get("precision_check"))
    body += length_markdown(matched_rows)
    curves = val_curves(runs)  # the joint runs' validation PPL by step, against fixed at the same step
    metrics["val_curves"] = {name: {str(step): ppl for step, ppl in points.items()} for name, points in curves.items()}
    body += curve_markdown(curves)
    figures = {"ppl": ppl_fig, "nll_by_position": position_fig}
    if any(len(points) > 1 for points in curves.values()):
        figures["val_curve"] = plot_curves(curves, out / CURVE_PLOT)
    atomic_write_text(out / "results.md", body)
    atomic_write_text(out / "metrics.json", json.dumps(finite({k: v for k, v in metrics.items() if k != "table"}),
                                                     indent=2) + "\n")
    scalars: dict[str, float] = {}
    for row in metrics["rows"]:
        name = f"{row['run']}/{row['source']}"
        if "ppl" in row:
            scalars[f"test/ppl/{name}"] = row["ppl"]["value"]
        for key in ("top1", "top5", "mean_rank", "rouge2", "edit", "follow"):
            if row.get(key) is not None:
                scalars[f"test/{key}/{row['run']}"] = row[key]
    log_to_tensorboard(out / "tb", scalars, figures, {"results": body})
    return [f"{name}.png" for name in figures]


def finite(value: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to null."""
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
