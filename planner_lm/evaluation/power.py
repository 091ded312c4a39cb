"""What a verdict rests on: the Δ a test split can resolve, and the Δ that retraining alone moves.

The bootstrap CI of a paired Δ (`bootstrap.py`) says how sure one split is about one pair of trained
runs. Two more figures say what a Δ means:

- **Per-document spread and resolvable Δ.** The paired Δ of a run against a reference is
  `exp((Σ a_i − Σ b_i) / Σ t_i) − 1` over documents i (summed NLL a_i and b_i of its t_i tokens). Its
  standard error by the delta method (a ratio estimator, residuals `d_i − r t_i` with `d_i = a_i − b_i`
  and `r = Σ d_i / Σ t_i`) is `SE = (1 + Δ) · sqrt(n / (n − 1) · Σ (d_i − r t_i)²) / Σ t_i`. The
  per-document spread `SD = SE · sqrt(n)` does not depend on the split's size, so it sizes other
  splits: at 80 % power and a two-sided 5 % level a split resolves `MDE = (z_0.975 + z_0.8) · SE`,
  and a target Δ needs `n · (MDE / target)²` documents.
- **The noise floor.** The Δ between this run's `fixed` and a second `fixed` that differs only in
  seed (data order and adapter initialisation; `<run>/seed-<n>`, `NULL_SEED` in the Makefile):
  what training noise alone moves, which the bootstrap over documents does not see.

A verdict says a run helps (or hurts) only when its CI excludes 0 **and** |Δ| exceeds the noise floor.
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import numpy as np

from planner_lm.artifacts import Manifest
from planner_lm.evaluation.bootstrap import Interval, relative_change_interval
from planner_lm.errors import UserError
from planner_lm.models.selection import SELECTION_ROLES, eval_source
from planner_lm.run_folder import JointRun, RunFolder, finished

ALPHA, POWER = 0.05, 0.8
Z_POWER = NormalDist().inv_cdf(1 - ALPHA / 2) + NormalDist().inv_cdf(POWER)
"""z_0.975 + z_0.8 ≈ 2.80: the minimum detectable effect in standard errors."""
TARGET_DELTA = 0.005
"""The Δ the evaluation should resolve (issue 31: the papers' effects are about 1 %)."""
NULL_SELECTION = "fixed"
"""The run trained twice for the noise floor: it has no planner, so only the seed can differ."""
SEED_ONLY_KEYS = frozenset({"seed_everything", "run_dir", "overwrite", "config", "progress",
                            "checkpoint_every_n_steps", "checkpoint_every_minutes"})
"""Config keys two runs may differ in and still be "the same run with another seed"."""


def paired_spread(doc_nll: np.ndarray, reference_nll: np.ndarray, doc_tokens: np.ndarray) -> dict[str, float]:
    """SE, per-document SD, resolvable Δ and documents needed for `TARGET_DELTA` of one paired Δ (see
    the module doc); NaN where fewer than two documents leave no spread to measure."""
    diff = np.asarray(doc_nll, float) - np.asarray(reference_nll, float)
    tokens = np.asarray(doc_tokens, float)
    n, total = len(diff), float(tokens.sum())
    if n < 2 or total <= 0:
        return {"se": math.nan, "spread": math.nan, "mde": math.nan, "docs_for_target": math.nan}
    rate = diff.sum() / total
    se = math.exp(rate) * math.sqrt(n / (n - 1) * float(((diff - rate * tokens) ** 2).sum())) / total
    return {"se": se, "spread": se * math.sqrt(n), "mde": Z_POWER * se,
            "docs_for_target": math.ceil(n * (Z_POWER * se / TARGET_DELTA) ** 2)}


def verdict(change: Interval, floor: float | None, better: str = "helps", worse: str = "hurts") -> str:
    """`better`/`worse` only when the CI excludes 0 and |Δ| exceeds the noise floor (negative Δ = better)."""
    if change.low <= 0.0 <= change.high:
        return "unresolved (CI includes 0)"
    if floor is not None and abs(change.value) <= floor:
        return "within training noise"
    word = better if change.value < 0 else worse
    return word if floor is not None else f"{word} (no noise floor measured)"


def null_fixed_run(folder: RunFolder, runs: list[JointRun], seed: int) -> JointRun:
    """`<run>/seed-<seed>/4_joint-fixed`, checked to be this run's `fixed` trained again with only its seed changed."""
    fixed = next((run for run in runs if run.selection == NULL_SELECTION), None)
    if fixed is None:
        raise UserError(f"null_seed {seed} compares two `{NULL_SELECTION}` runs: evaluate this run's "
                        f"{NULL_SELECTION} run too (add it to --runs)")
    other = RunFolder(folder.seed_dir(seed))
    directory = other.dir("finetune_joint", NULL_SELECTION)
    if not finished(directory):
        raise UserError(f"null_seed {seed}: {directory} is not a finished run; train it with "
                        f"`make evaluate RUN={folder.root} NULL_SEED={seed}` (or drop --null_seed)")
    null = other.joint_run(NULL_SELECTION)
    differ = seed_only_differences(fixed.manifest, null.manifest)
    if differ:
        raise UserError(f"null_seed {seed}: {null.dir} differs from {fixed.dir} in more than the seed "
                        f"({', '.join(differ[:3])}); train it again with `make evaluate NULL_SEED={seed}`")
    if null.manifest.data.get("seed") == fixed.manifest.data.get("seed"):
        raise UserError(f"null_seed {seed}: {null.dir} was trained with the same seed as {fixed.dir}")
    return null


def seed_only_differences(first: Manifest, second: Manifest) -> list[str]:
    """Config keys and upstream stages in which two joint runs differ, besides their seed and run
    directory (paths inside the second run's directory count as the same paths in the first's)."""
    roots = str(second.config.get("run_dir", "")), str(first.config.get("run_dir", ""))

    def flat(config: Any, prefix: str = "", swap: bool = False) -> dict[str, Any]:
        if isinstance(config, dict):
            return {key: value for name, sub in config.items() if str(name).rsplit(".", 1)[-1] not in SEED_ONLY_KEYS
                    for key, value in flat(sub, f"{prefix}{name}.", swap).items()}
        if swap and isinstance(config, str) and roots[0] and config.startswith(roots[0]):
            config = roots[1] + config[len(roots[0]):]
        return {prefix.rstrip("."): config}

    one, two = flat(first.config), flat(second.config, swap=True)
    differ = sorted(key for key in one.keys() | two.keys() if one.get(key) != two.get(key))
    reads_planner = SELECTION_ROLES[str(first.facts.get("selection", NULL_SELECTION))].uses_planner
    for name in sorted(first.inputs.keys() | second.inputs.keys()):
        if name == "planner" and not reads_planner:
            continue  # recorded, never read: a seed directory may have trained its own planner
        hashes = [m.inputs.get(name, {}).get("manifest_hash") for m in (first, second)]
        if hashes[0] != hashes[1]:
            differ.append(f"input {name}")
    return differ


def _comparison(label: str, steps: tuple[int | None, int | None], result: Any, reference: Any,
                indices: np.ndarray, confidence: float, floor: float | None, better: str, worse: str) -> dict[str, Any]:
    change = relative_change_interval(result.doc_nll, reference.doc_nll, result.doc_tokens, indices, confidence)
    return {"label": label, "total_steps": list(steps), "change": change.as_dict(),
            **paired_spread(result.doc_nll, reference.doc_nll, result.doc_tokens),
            "verdict": verdict(change, floor, better, worse)}


def power_report(runs: list[JointRun], results: dict, pairs: list[dict[str, Any]], null: JointRun | None,
                 null_result: Any, indices: np.ndarray, confidence: float) -> dict[str, Any]:
    """The noise floor, and for every run against `fixed` and every scored pair: Δ with its CI,
    per-document spread, resolvable Δ, documents needed for `TARGET_DELTA` and the verdict."""
    steps = {run.selection: run.total_steps for run in runs}
    own = {run.selection: results.get((run.selection, eval_source(run.selection))) for run in runs}
    fixed = own.get(NULL_SELECTION)
    report: dict[str, Any] = {"alpha": ALPHA, "power": POWER, "z": Z_POWER, "target": TARGET_DELTA,
                              "docs": len(indices[0]) if len(indices) else 0, "null": None, "noise_floor": None,
                              "comparisons": []}
    if fixed is None:
        return report
    if null is not None and null_result is not None:
        seed = null.manifest.data.get("seed")
        report["null"] = {**_comparison(f"fixed (seed {seed}) vs fixed", (null.total_steps, steps[NULL_SELECTION]),
                                        null_result, fixed, indices, confidence, None, "", ""),
                          "seed": seed, "verdict": "noise floor"}
        report["noise_floor"] = abs(report["null"]["change"]["value"])
    floor = report["noise_floor"]
    for run in runs:
        if run.selection != NULL_SELECTION and own[run.selection] is not None:
            report["comparisons"].append(_comparison(
                f"{run.selection} vs fixed", (steps[run.selection], steps[NULL_SELECTION]), own[run.selection],
                fixed, indices, confidence, floor, "helps", "hurts"))
    for pair in pairs:
        first, second = own.get(pair["run"]), own.get(pair["reference"])
        if first is not None and second is not None:
            report["comparisons"].append(_comparison(
                pair["label"], (steps[pair["run"]], steps[pair["reference"]]), first, second, indices, confidence,
                floor, "better", "worse"))
    return report


def _pct(value: float, sign: bool = False) -> str:
    return "–" if value is None or not math.isfinite(value) else (f"{value:+.2%}" if sign else f"{value:.2%}")


def _steps(steps: list[int | None]) -> str:
    shown = " vs ".join("?" if s is None else f"{s:,}" for s in steps)
    return shown + (" (unequal)" if None not in steps and len(set(steps)) > 1 else "")


def power_markdown(report: dict[str, Any] | None) -> str:
    """The verdict table of `power_report` with the noise floor above it (empty without comparisons)."""
    if not report or not report["comparisons"]:
        return ""
    null = report["null"]
    if null is None:
        floor = ("Noise floor: not measured (no second `fixed` run with another seed; `NULL_SEED=43` trains one), "
                 "so no verdict below is checked against training noise.")
    else:
        change = null["change"]
        floor = (f"Noise floor: `fixed` trained again with seed {null['seed']} (data order and adapter "
                 f"initialisation; nothing else changed) lands at {_pct(change['value'], True)} "
                 f"[{_pct(change['low'], True)}, {_pct(change['high'], True)}] from `fixed` "
                 f"(per-document SD {_pct(null['spread'])}); a verdict needs its CI to exclude 0 and |Δ| above "
                 f"{_pct(report['noise_floor'])}.")
    mdes = [c["mde"] for c in report["comparisons"] if math.isfinite(c["mde"])]
    resolves = (f"; it resolves {_pct(min(mdes))}–{_pct(max(mdes))} depending on the comparison" if mdes else "")
    lines = ["", "Verdicts, with what this split can resolve. " + floor,
             f"Resolvable Δ: the smallest true Δ this split detects with {100 * report['power']:.0f} % power at the "
             f"two-sided {100 * report['alpha']:.0f} % level, (z₀.₉₇₅ + z₀.₈) × SE = {report['z']:.2f} × SE, with SE the "
             f"delta-method standard error of the paired Δ and per-document SD = SE × √n over its "
             f"{report['docs']:,} documents{resolves}. Total steps count from each run's initialisation (a warm "
             "start includes its source's).", "",
             f"| comparison | total steps | Δ [95 % CI] | per-document SD | resolvable Δ | documents for "
             f"±{report['target']:.1%} | verdict |", "|---|---|---|---|---|---|---|"]
    for c in ([null] if null else []) + report["comparisons"]:
        change = c["change"]
        needed = "–" if not math.isfinite(c["docs_for_target"]) else f"{c['docs_for_target']:,}"
        lines.append(f"| {c['label']} | {_steps(c['total_steps'])} | {_pct(change['value'], True)} "
                     f"[{_pct(change['low'], True)}, {_pct(change['high'], True)}] | {_pct(c['spread'])} | "
                     f"{_pct(c['mde'])} | {needed} | {c['verdict']} |")
    return "\n".join(lines) + "\n"
