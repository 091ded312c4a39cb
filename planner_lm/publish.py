"""Share a joint run like any Hugging Face model: `python -m planner_lm.publish RUN [--repo user/name]`.

Writes `<run>/4_joint-<selection>/hub/{lm,planner}`: the conditioned LM (self-contained: its
tokenizer, and its base weights whenever the base is a local folder nobody else has) and the
planner, each with safetensors weights, JSON configs and a model card written from the run's
manifests (base LM, encoder, codebook, corpus, protocol) and, once `make evaluate` ran, its
results rows. With `--repo`, pushes the LM to `user/name` and the planner to `user/name-planner`
(a Hugging Face token with write access is needed). Load them back, anywhere:

    ActionConditionedLM.from_pretrained("user/name"), Planner.from_pretrained("user/name-planner")
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any, Sequence

from planner_lm.artifacts import list_files
from planner_lm.ownership import check_owned_folder, mark, private_sibling, replace_folder
from planner_lm.errors import UserError, friendly_errors
from planner_lm.run_folder import JointRun, RunFolder

PAPER = "End-to-end Planner Training for Language Modeling (Cornille, Mai, Sun, Moens, 2024)"


def _facts(folder: RunFolder, run: JointRun) -> dict[str, Any]:
    """What a reader of the card needs to know about how the run was made (from its manifests)."""
    prepared, cluster = folder.prepared.manifest, folder.cluster_manifest()
    settings = folder.encoder_settings()
    return {
        "base LM": f"{run.manifest.facts.get('lm_name', '?')} ({run.manifest.facts.get('base_mode', '?')} base weights)",
        "selection": run.selection,
        "sentence encoder": f"{settings['encoder']} (max_seq_length {settings['max_seq_length']})",
        "writing actions": f"k = {cluster.fact('num_actions')} k-means centroids of the sentence embeddings",
        "planner context": f"{run.manifest.facts.get('context_sentences')} previous sentences",
        "training corpus": f"{prepared.facts.get('corpus', '?')}, {prepared.facts.get('num_docs', '?')} documents",
        "joint steps": run.manifest.metrics.get("steps"),
        "validation perplexity": run.manifest.metrics.get("val/ppl"),
    }


def _results(folder: RunFolder, selection: str) -> str:
    """The run's rows of the evaluation table (with its setting line), or a note that none exist."""
    metrics_path = folder.eval_dir() / "metrics.json"
    if not metrics_path.is_file():
        return "Not evaluated yet (`make evaluate`)."
    from planner_lm.evaluation.results import setting_line

    metrics = json.loads(metrics_path.read_text())
    rows = [r for r in metrics["rows"] if r["run"] in (selection, "fixed", "none") and r.get("matched")]
    lines = [setting_line(metrics["protocol"]), "", "| run · code source | test PPL [95 % CI] | Δ vs fixed [95 % CI] |",
             "|---|---|---|"]
    for row in rows:
        ppl, delta = row["ppl"], row.get("vs_fixed")
        change = f"{delta['value']:+.2%} [{delta['low']:+.2%}, {delta['high']:+.2%}]" if delta else "–"
        lines.append(f"| {row['label']} | {ppl['value']:.2f} [{ppl['low']:.2f}, {ppl['high']:.2f}] | {change} |")
    return "\n".join(lines)


def model_card_body(folder: RunFolder, run: JointRun, what: str, repo: str | None) -> str:
    """Markdown of the card of the conditioned LM (`what="lm"`) or of its planner (`"planner"`)."""
    name = repo or f"{folder.root.name}/{run.dir.name}"
    if what == "lm":
        title = f"# {name}: an action-conditioned causal LM (planner-lm)"
        intro = ("A causal LM whose layers read a *writing action* per sentence through small adapters, trained "
                 f"end to end with a planner that predicts the next sentence's action ({PAPER}). Give it the "
                 "planner's action weights, or write with the planner in the loop (`planner_lm.generation`).")
        usage = ("from planner_lm.models.conditioning import ActionConditionedLM\n"
                 f"lm = ActionConditionedLM.from_pretrained({(repo or str(run.lm_dir))!r})")
    else:
        title = f"# {name}: the sentence-level planner (planner-lm)"
        intro = ("A small transformer that reads the embeddings of the previous sentences and predicts the next "
                 f"sentence's writing action (k-means cluster of sentence embeddings) ({PAPER}).")
        usage = ("from planner_lm.models.planner import Planner\n"
                 f"planner = Planner.from_pretrained({(f'{repo}-planner' if repo else str(run.dir))!r})")
    facts = "\n".join(f"| {key} | {value} |" for key, value in _facts(folder, run).items() if value is not None)
    return (f"{title}\n\n{intro}\n\n| | |\n|---|---|\n{facts}\n\n## Results\n\n{_results(folder, run.selection)}\n\n"
            f"## Use\n\n```python\n{usage}\n```\n\nMade with planner-lm; weights are safetensors only.\n")


def publish(run_dir: str | Path, selection: str = "soft", repo: str | None = None, output: str | Path | None = None,
            private: bool = False) -> Path:
    """Save (and with `repo`, push) the run's conditioned LM and planner; returns the output folder."""
    from planner_lm.models.conditioning import ActionConditionedLM
    from planner_lm.models.planner import Planner
    from planner_lm.tokenization import load_tokenizer

    folder = RunFolder(run_dir)
    run = folder.joint_run(selection)
    out = Path(output) if output else run.hub_dir
    _check_output(out)
    lm = ActionConditionedLM.from_pretrained(run.lm_dir)
    local_base = Path(lm.base_reference).is_dir() if lm.base_reference else False
    push = {"push_to_hub": True, "repo_id": repo, "private": private} if repo else {}
    built = private_sibling(out)  # written beside `out`, then renamed into place
    try:
        lm.save_pretrained(built / "lm", tokenizer=load_tokenizer(str(folder.tokenizer_dir(run))),
                           include_base=local_base,
                           model_card_kwargs={"body": model_card_body(folder, run, "lm", repo)}, **push)
        planner_path = folder.planner_path_for(run)
        if planner_path is not None:
            if repo:
                push["repo_id"] = f"{repo}-planner"
            Planner.from_pretrained(planner_path).save_pretrained(
                built / "planner", model_card_kwargs={"body": model_card_body(folder, run, "planner", repo)}, **push)
        mark(built, "publish", run=str(run.dir), files=list_files(built))
        replace_folder(built, out, "publish")
    except BaseException:
        shutil.rmtree(built, ignore_errors=True)
        raise
    print(f"saved {run.dir.name} to {out}" + (f" and pushed it to {repo} (+ {repo}-planner)" if repo else ""))
    return out


def _check_output(out: Path) -> None:
    """Refuse, before any work, an output folder that holds anything but an earlier publish, or an
    earlier publish holding files the user added (replacing it would delete them)."""
    check_owned_folder(out, "publish", "--output")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="run directory, e.g. runs/demo")
    parser.add_argument("--selection", default="soft", help="which joint run (4_joint-<selection>)")
    parser.add_argument("--repo", default=None, help="Hub repository id to push to, e.g. user/planner-lm-demo")
    parser.add_argument("--output", default=None, help="local folder to save into (default: <joint run>/hub)")
    parser.add_argument("--private", action="store_true", help="create the Hub repositories as private")
    args = parser.parse_args(argv)
    with friendly_errors():
        if args.repo and "/" not in args.repo:
            raise UserError(f"--repo must be <user or org>/<name>, got {args.repo!r}")
        publish(args.run_dir, args.selection, args.repo, args.output, args.private)


if __name__ == "__main__":
    main()
