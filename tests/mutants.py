"""Mutation check (`make mutants`): break the method one way at a time; a targeted test must fail.

Each mutant replaces one exact snippet of library code in a temporary copy of the working tree
and runs the tests meant to catch it. A snippet that is not found exactly once stops the check
(a mutant that no longer applies must not count as killed): update it when the code moves.
Not part of `make test` (pytest only collects `test_*.py`); takes a few minutes on 2 cores.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


ALIGN = "tests/test_alignment.py"
JOINT_STAGE = "tests/test_joint.py::test_stage_saves_a_loadable_conditioned_lm_planner_and_manifest"
LEAK = "tests/test_evaluate_stage.py::test_planner_and_controls_never_see_the_scored_sentence"
MUTANTS = [
    Mutant("1a: token cache targets the token's own sentence", "planner_lm/data/lm_windows.py",
           "target_parts.append(doc.target_sentence.astype(np.int64)",
           "target_parts.append(np.maximum(doc.sentence, 0).astype(np.int64)", (ALIGN,)),
    Mutant("1b: training windows target the token's own sentence", "planner_lm/data/lm_windows.py",
           "target[:length] = self.tokens.target_sentence[doc_offset + start : doc_offset + end]",
           "target[:length] = self.tokens.target_sentence[doc_offset + np.maximum(np.arange(start, end) - 1, 0)]",
           (ALIGN,)),
    Mutant("1c: tokenization without the one-token shift", "planner_lm/tokenization.py",
           "target[:-1] = sentence[1:]", "target[:-1] = np.maximum(sentence[:-1], 0)", (ALIGN,)),
    Mutant("2: evaluation scorer shifts the plan by one sentence", "planner_lm/evaluation/scoring.py",
           "rows = (cond - first).clamp(", "rows = (cond - first + 1).clamp(",
           ("tests/test_alignment.py::test_evaluation_gives_each_token_the_code_of_the_next_tokens_sentence",)),
    Mutant("3: planner left out of the joint optimizer", "planner_lm/lit/joint.py",
           "            groups.append({\"params\": list(self.planner.parameters()), \"lr\": planner_lr",
           "            pass  # groups.append({\"params\": list(self.planner.parameters()), \"lr\": planner_lr",
           (JOINT_STAGE,)),
    Mutant("4: planner_soft scores with the true actions (oracle leakage)", "planner_lm/evaluation/scoring.py",
           'return select_weights(logits, "soft", temperature=temperature)',
           'return select_weights(None, "oracle", oracle_actions=actions, num_actions=num_actions)', (LEAK,)),
    *(Mutant(f"5{suffix}: planner context includes the target sentence ({where})", "planner_lm/data/contexts.py",
             "torch.arange(-context_sentences, 0,", "torch.arange(1 - context_sentences, 1,", (test,))
      for suffix, where, test in [
          ("a", "pretrain-planner", "tests/test_planner_stage.py::test_unpredictable_actions_stay_unpredictable"),
          ("b", "joint batches",
           "tests/test_joint.py::test_batch_runs_the_planner_once_per_distinct_target_sentence"),
          ("c", "evaluate", LEAK)]),
    Mutant("6: joint stage accepts a planner of an older k-means run", "planner_lm/run_folder.py",
           'planner.check_built_from("cluster", cluster)', "pass",
           ("tests/test_joint.py::test_planner_of_an_older_kmeans_run_is_refused",)),
    Mutant("7: oracle/fixed/uniform runs build a planner", "planner_lm/lit/joint.py",
           "self.uses_planner = selection in PLANNER_SELECTIONS", 'self.uses_planner = selection != "none"',
           ("tests/test_joint.py::test_oracle_and_content_free_selections_build_no_planner",)),
    Mutant("8: validation perplexity averaged over windows, not tokens", "planner_lm/lit/joint.py",
           "self.val_nll.update(nll / count, weight=count)", "self.val_nll.update(nll / count)", (JOINT_STAGE,)),
    Mutant("9: a crashed run restarts from scratch instead of resuming", "planner_lm/cli.py",
           'return decided_on_rank_zero(cli.trainer, f"resume {folder.resolve()}", decide)',
           'return decided_on_rank_zero(cli.trainer, f"resume {folder.resolve()}", lambda: decide() and None)',
           ("tests/test_planner_stage.py::test_resume_after_a_crash_matches_an_uninterrupted_run",
            "tests/test_reliability.py::test_lm_resumes_mid_epoch_from_a_step_checkpoint_to_the_same_weights")),
    Mutant("10: soft planner codes scored at T = 1 whatever the run was trained with", "planner_lm/evaluation/scoring.py",
           'return select_weights(logits, "soft", temperature=temperature)', 'return select_weights(logits, "soft")',
           ("tests/test_evaluate_stage.py::test_planner_codes_use_the_temperature_the_run_was_trained_with",)),
    Mutant("11: boundary control counts sentences across documents", "planner_lm/data/joint_data.py",
           'batch["plan_position"] = plan_sentence - plan_doc_first', 'batch["plan_position"] = plan_sentence',
           ("tests/test_joint.py::test_boundary_control_alternates_by_sentence_and_builds_no_planner",)),
    Mutant("12: joint stage hands off the final weights, not the best validated", "planner_lm/lit/joint.py",
           "if self.hparams.export_best and self.best.step != self.global_step and self.best.restore(self):",
           "if False:", ("tests/test_joint.py::test_best_validation_weights_are_handed_off",)),
    Mutant("13: under DDP each process averages over its own tokens, not the global batch", "planner_lm/lit/losses.py",
           "    if world > 1:\n        count = trainer.strategy.reduce", "    if False:\n        count = trainer.strategy.reduce",
           ("tests/test_ddp.py::test_ddp_soft_with_a_delayed_unfreeze_matches_one_process_and_half_a_batch_does_not",)),
    Mutant("14: an unfreeze schedule lets held parameters train", "planner_lm/lit/callbacks.py",
           "                parameter.grad = None", "                pass",
           ("tests/test_joint.py::test_unfreeze_schedule_holds_weights_until_the_global_step",)),
    Mutant("15: activation checkpointing recomputes blocks without the actions", "planner_lm/models/conditioning.py",
           "keep = action_weights is not None and _checkpointing(self.base) and torch.is_grad_enabled()", "keep = False",
           ("tests/test_conditioning.py::test_activation_checkpointing_gives_the_same_gradients",)),
    Mutant("16: resume checkpoints carry the frozen base", "planner_lm/lit/joint.py",
           "        for key in self._frozen_base_keys():\n            state.pop(key, None)",
           "        pass",
           ("tests/test_joint.py::test_resume_checkpoints_leave_the_frozen_base_out_and_still_resume",)),
    Mutant("17: k-means Hartigan step ignores the cluster sizes of the clusters a point could join",
           "planner_lm/models/kmeans.py", "        cost.mul_(move_weight)  # the cost of joining each other cluster",
           "        pass", ("tests/test_kmeans.py::test_hartigan_assign_follows_the_size_weighted_rule",)),
    Mutant("18: k-means keeps a Hartigan iteration that raised the inertia", "planner_lm/lit/kmeans.py",
           "if hartigan and improvement is not None and improvement < 0:", "if False:",
           ("tests/test_kmeans.py::test_a_hartigan_iteration_that_raises_the_inertia_is_undone",)),
    Mutant("S1: a downloaded config may point its base outside the download", "planner_lm/models/conditioning.py",
           '    relative = config.get("base_relative")\n    if downloaded:', '    relative = config.get("base_relative")\n    if False:',
           ("tests/test_publish.py::test_a_hostile_conditioned_lm_is_refused_before_anything_is_built",)),
    Mutant("S2: a missing path becomes a Hub id", "planner_lm/model_files.py",
           "    if path_only(text):\n", "    if False:\n",
           ("tests/test_publish.py::test_names_that_can_only_be_paths_never_reach_the_hub",)),
    Mutant("S3: a resume unpickles what its checkpoint holds", "planner_lm/lit/checkpointing.py",
           'torch.load(path, map_location="cpu", weights_only=True, mmap=True)',
           'torch.load(path, map_location="cpu", weights_only=False)',
           ("tests/test_reliability.py::test_a_checkpoint_holding_a_pickled_object_is_refused_without_running_it",)),
    Mutant("19: a resumed joint run re-measures the tuned planner as its accuracy before joint training",
           "planner_lm/lit/joint.py", '        self.planner_acc_start = checkpoint.get("planner_acc_start")', "        pass",
           ("tests/test_joint.py::test_a_resumed_run_reports_the_accuracy_of_the_planner_before_joint_training",)),
    Mutant("20: an outside corpus's token cache is reused for an edited corpus with as many documents",
           "planner_lm/evaluation/texts.py", 'cache_dir / "tokens" / documents_digest(table)', 'cache_dir / "tokens"',
           ("tests/test_evaluate_stage.py::test_an_edited_corpus_with_as_many_documents_is_tokenized_again",)),
]


def copy_tree(target: Path) -> None:
    """Tracked and untracked (not ignored) files of the working tree: the code as it is now."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def run_tests(tree: Path, tests: tuple[str, ...]) -> tuple[int, str]:
    """pytest's exit code and what it reported: the `FAILED`/`ERROR` lines (which test, and why)
    and its final count, e.g. `2 failed, 1 passed`."""
    env = {**os.environ, "PYTHONPATH": str(tree), "COLUMNS": "200"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:warnings", *tests]
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    failures = [line[:200] for line in lines if line.startswith(("FAILED ", "ERROR "))]
    return done.returncode, "\n".join([*failures, lines[-1] if lines else done.stderr.strip()[-200:]])


def mutated(tree: Path, mutant: Mutant) -> tuple[str, str]:
    """The file's text and its mutated text; stops the check when the snippet is not there once."""
    original = (tree / mutant.file).read_text()
    if original.count(mutant.old) != 1:
        raise SystemExit(f"mutant {mutant.name!r}: snippet found {original.count(mutant.old)} times in "
                         f"{mutant.file}, expected once; update tests/mutants.py")
    return original, original.replace(mutant.old, mutant.new)


def check(tree: Path, mutant: Mutant) -> tuple[str, str]:
    """`killed` (a test failed), `SURVIVED` (all passed) or `ERROR` (pytest could not run them),
    with pytest's first failure line."""
    path = tree / mutant.file
    original, text = mutated(tree, mutant)
    path.write_text(text)
    try:
        code, detail = run_tests(tree, mutant.tests)
    finally:
        path.write_text(original)
    return {0: "SURVIVED", 1: "killed"}.get(code, f"ERROR (pytest exit {code})"), detail


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="mutants-") as folder:
        tree = Path(folder)
        copy_tree(tree)
        for mutant in MUTANTS:  # every snippet still applies, before minutes of tests
            mutated(tree, mutant)
        tests = tuple(dict.fromkeys(t for m in MUTANTS for t in m.tests))
        code, detail = run_tests(tree, tests)
        if code != 0:
            print(f"the targeted tests fail on the unmutated code; fix them first:\n  {detail}")
            return 1
        results = {}
        for mutant in MUTANTS:
            results[mutant.name], detail = check(tree, mutant)
            print(f"{results[mutant.name]:>9}  {mutant.name}", *detail.splitlines(), sep="\n           ", flush=True)
    survivors = [name for name, result in results.items() if result != "killed"]
    print(f"{len(results) - len(survivors)}/{len(results)} mutants killed" +
          (f"; not killed: {', '.join(survivors)}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
