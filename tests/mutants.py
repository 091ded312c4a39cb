"""Mutation check (`make mutants`): break the method one way at a time; a targeted test must fail.

Each mutant replaces one exact snippet of library code in a temporary copy of the working tree
and runs the tests meant to catch it. A snippet that is not found exactly once stops the check
(a mutant that no longer applies must not count as killed): update it when the code moves.
Not part of `make test` (pytest only collects `test_*.py`); takes a few minutes on 2 cores.
`--list` prints the mutants, `--only 2,27` runs some of them, `--tests PATH...` runs other tests
against them (to find which tests catch a new mutant).
"""
from __future__ import annotations

import argparse
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
    Mutant("3: planner left out of the joint optimizer", "planner_lm/lit/joint_setup.py",
           "        groups.append({\"params\": list(module.planner.parameters()), \"lr\": planner_lr",
           "        groups.append({\"params\": [], \"lr\": planner_lr",
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
    Mutant("S1: a downloaded config may point its base outside the download", "planner_lm/models/conditioned_files.py",
           '    relative, base = config.get("base_relative"), config["base"]\n    if source.untrusted:',
           '    relative, base = config.get("base_relative"), config["base"]\n    if False:',
           ("tests/test_publish.py::test_a_hostile_conditioned_lm_is_refused_before_anything_is_built",)),
    Mutant("S2: a missing path becomes a Hub id", "planner_lm/model_files.py",
           "    if path_only(text):\n", "    if False:\n",
           ("tests/test_publish.py::test_names_that_can_only_be_paths_never_reach_the_hub",)),
    Mutant("S3: a resume unpickles what its checkpoint holds", "planner_lm/lit/checkpointing.py",
           'torch.load(path, map_location="cpu", weights_only=True, mmap=True)',
           'torch.load(path, map_location="cpu", weights_only=False)',
           ("tests/test_reliability.py::test_a_checkpoint_holding_a_pickled_object_is_refused_without_running_it",)),
    Mutant("F1: a resumed joint run re-measures the tuned planner as its accuracy before joint training",
           "planner_lm/lit/joint.py", '        self.planner_acc_start = checkpoint.get("planner_acc_start")', "        pass",
           ("tests/test_joint.py::test_a_resumed_run_reports_the_accuracy_of_the_planner_before_joint_training",)),
    Mutant("F2: an outside corpus's token cache is reused for an edited corpus with as many documents",
           "planner_lm/evaluation/texts.py", 'cache_dir / "tokens" / documents_digest(table)', 'cache_dir / "tokens"',
           ("tests/test_evaluate_stage.py::test_an_edited_corpus_with_as_many_documents_is_tokenized_again",)),
]

# Mutants 19-39 were designed from the README's claims and the library code alone, before the tests
# meant to catch them were read (issue 22: a different hand).
PERPLEXITY, GUARDS = "tests/test_perplexity.py", "tests/test_guards.py"
BASELINES = f"{GUARDS}::test_content_free_baselines_copy_the_previous_sentence_and_learn_bigrams_from_training_only"
EVAL_TABLE = f"{GUARDS}::test_evaluation_table_recomputed_from_each_runs_own_codes"
FORCED_PLAN = "tests/test_generation.py::test_forced_plan_conditions_each_sentence_on_its_action"
CORPUS_ACTIONS = f"{GUARDS}::test_sentences_of_another_corpus_get_their_own_nearest_centroid"
MUTANTS += [
    Mutant("19: sliding windows give each target one token less context than the window allows",
           "planner_lm/evaluation/perplexity.py",
           "windows.append(Window(doc, max(0, new_end - window), new_end, end))",
           "windows.append(Window(doc, max(0, new_end - window + 1), new_end, end))", (f"{PERPLEXITY}::test_windows_cover_every_target_once",)),
    Mutant("20: the paired bootstrap resamples the reference run differently (not paired)",
           "planner_lm/evaluation/bootstrap.py", "reference_nll, doc_tokens, indices",
           "reference_nll, doc_tokens, indices[::-1]", (f"{PERPLEXITY}::test_paired_relative_change_detects_a_small_consistent_gain",)),
    Mutant("21: a 95 % CI cut at the 5th/95th percentiles (a 90 % interval)", "planner_lm/evaluation/bootstrap.py",
           "alpha = (1.0 - confidence) / 2.0", "alpha = 1.0 - confidence", (f"{GUARDS}::test_ppl_interval_is_the_2_5_and_97_5_percentiles_of_the_resampled_ppls",)),
    Mutant("22: planner top-5 computed as top-4", "planner_lm/evaluation/planner_metrics.py",
           "top = min(5, logits.shape[1])", "top = min(4, logits.shape[1])", (f"{GUARDS}::test_planner_scores_recomputed_by_hand",)),
    Mutant("23: the previous-action baseline copies the target sentence's own action",
           "planner_lm/evaluation/planner_metrics.py", "np.asarray(actions)[np.maximum(ids - 1, 0)]",
           "np.asarray(actions)[ids]", (BASELINES,)),
    Mutant("24: the action bigram is fitted on the scored sentences, not the training split",
           "planner_lm/evaluation/planner_metrics.py",
           "np.add.at(transitions, (train_prev, actions[train_ids]), 1)",
           "np.add.at(transitions, (previous_actions(actions, val_ids, doc_first, num_actions), actions[val_ids]), 1)",
           ("tests/test_planner_stage.py::test_baselines_on_a_handmade_sequence",)),
    Mutant("25: evaluation scores a tuned run with the pretrained planner instead of its own",
           "planner_lm/pipeline/evaluate.py", 'planner_name = run.selection if run.selection in logits else "pretrained"',
           'planner_name = "pretrained" if "pretrained" in logits else run.selection', (EVAL_TABLE,)),
    Mutant("26: the evaluation's boundary code counts sentences across documents", "planner_lm/evaluation/scoring.py",
           "return self.sentence_ids - self.sentence_doc_first", "return self.sentence_ids", (EVAL_TABLE,)),
    Mutant("27: Δ vs a control computed the wrong way round (the control against the run)",
           "planner_lm/evaluation/results.py", "relative_change_interval(result.doc_nll, reference.doc_nll,",
           "relative_change_interval(reference.doc_nll, result.doc_nll,", (EVAL_TABLE,)),
    Mutant("28: PPL by document length leaves out documents on a bucket's lower edge",
           "planner_lm/evaluation/results.py", "keep = (counts >= lo) &", "keep = (counts > lo) &", (EVAL_TABLE,)),
    Mutant("29: the significance mark only for CIs below 0 (a significant loss goes unmarked)",
           "planner_lm/evaluation/report.py", "(cell.low > 0 or cell.high < 0)", "(cell.high < 0)", (f"{GUARDS}::test_a_change_is_marked_whenever_its_interval_excludes_zero_in_either_direction",)),
    Mutant("30: harness scoring lets the planner read the sentence being scored", "planner_lm/planned_scoring.py",
           "planner_logits([vectors[:j] for j in range(len(spans))])",
           "planner_logits([vectors[:j + 1] for j in range(len(spans))])",
           (f"{GUARDS}::test_harness_plans_each_sentence_from_the_sentences_before_it_only",)),
    Mutant("31: harness loglikelihood counts the context's last token as continuation", "planner_lm/planned_scoring.py",
           "count = min(max(len(ids) - 1 - context_tokens, 1), len(targets))",
           "count = min(max(len(ids) - context_tokens, 1), len(targets))", ("tests/test_harness.py::test_continuation_loglikelihood_is_the_difference_of_prefix_scores",)),
    Mutant("32: generation re-plans one token late (the sentence-final token keeps the old action)",
           "planner_lm/generation.py",
           "            row.token_sentence[-1] = index  # the sentence-final token predicts the new sentence",
           "            pass", (FORCED_PLAN,)),
    Mutant("33: a forced plan starts one sentence late", "planner_lm/generation.py",
           "step = sentence_index - row.prompt_sentences", "step = sentence_index - row.prompt_sentences - 1", (FORCED_PLAN,)),
    Mutant("34: from_pretrained gives every layer the first layer's codebook", "planner_lm/models/conditioning.py",
           'tensor.copy_(state[name].to(device))',
           'tensor.copy_((state[name][:1].expand_as(tensor) if name == "codebook" else state[name]).to(device))', ("tests/test_conditioning.py::test_save_load_round_trip_gives_identical_logits",)),
    Mutant("35: publish leaves a local base LM out of the shared folder", "planner_lm/publish.py",
           "include_base=local_base,", "include_base=False,", ("tests/test_publish.py::test_a_run_is_pushed_with_cards_and_loads_back_anywhere",)),
    Mutant("36: corpus evaluation writes length-sorted actions back in sorted order", "planner_lm/evaluation/texts.py",
           "actions[ids] = sentence_vectors.nearest_actions(chunk, codebook)",
           "actions[start:start + len(ids)] = sentence_vectors.nearest_actions(chunk, codebook)", (CORPUS_ACTIONS,)),
    Mutant("37: new text gets the farthest centroid as its action", "planner_lm/sentence_vectors.py",
           "ids, _ = torch_assign(vectors.float(), centroids.float().to(vectors.device))",
           "ids, _ = torch_assign(-vectors.float(), centroids.float().to(vectors.device))", (CORPUS_ACTIONS,)),
    Mutant("38: action edit distance charges 2 for a substitution", "planner_lm/evaluation/structure.py",
           "previous[j - 1] + (x != y)", "previous[j - 1] + 2 * (x != y)", (f"{PERPLEXITY}::test_edit_distance_and_plan_following",)),
    Mutant("39: ROUGE-2 reported as precision instead of F", "planner_lm/evaluation/structure.py",
           '["rouge2"].fmeasure', '["rouge2"].precision', (f"{GUARDS}::test_rouge2_is_the_f_measure_of_bigram_precision_and_recall",)),
]

# 40-42 were designed after reading the tests.
MUTANTS += [
    Mutant("40: Δ vs none measured against a none run that fine-tuned its base", "planner_lm/evaluation/results.py",
           'if (run.selection == "none" and run.manifest.facts.get("trained") is False)',
           'if run.selection == "none"',
           ("tests/test_references.py::test_delta_vs_none_only_ever_uses_the_untouched_base_lm",)),
    Mutant("41: evaluation runs the planners with dropout on", "planner_lm/evaluation/planner_metrics.py",
           "planner = planner.eval()", "planner = planner.train()", (EVAL_TABLE,)),
    Mutant("42: generation mixes the planner's codes at T = 1 whatever the run was trained with",
           "planner_lm/generation.py",
           "weights = select_weights(logits, config.selection, temperature=config.planner_temperature)",
           "weights = select_weights(logits, config.selection)",
           (f"{GUARDS}::test_generation_mixes_the_planners_codes_at_the_runs_temperature",)),
]


# 43-48: the fair content control, the position control, the bf16 guard and requested pairs (issue 31).
OTHER_DOC_UNIT = ("tests/test_evaluate_stage.py::test_other_document_partners_are_a_seeded_derangement_among_documents_"
                  "of_similar_length")
OTHER_DOC_FIGURE = "tests/test_reported_figures.py::test_own_plan_against_another_documents_plan"
MUTANTS += [
    Mutant("43: the other-document control takes the next document again", "planner_lm/evaluation/planner_metrics.py",
           "                partners[members] = drawn", "                partners[members] = (members + 1) % len(lengths)",
           (OTHER_DOC_UNIT, OTHER_DOC_FIGURE)),
    Mutant("44: the other plan clipped to its document's length instead of applied by relative position",
           "planner_lm/evaluation/planner_metrics.py", "position * counts[other] // counts[doc]",
           "torch.minimum(position, counts[other] - 1)",
           ("tests/test_evaluate_stage.py::test_other_document_control_feeds_the_planner_another_documents_context",
            OTHER_DOC_FIGURE)),
    Mutant("45: own-vs-other Δ computed the wrong way round", "planner_lm/evaluation/results.py",
           "relative_change_interval(own.doc_nll, other.doc_nll,", "relative_change_interval(other.doc_nll, own.doc_nll,",
           (OTHER_DOC_FIGURE,)),
    Mutant("46: the position control is not capped", "planner_lm/models/selection.py",
           "clamp(min=0, max=min(POSITION_CAP, k - 1))", "clamp(min=0, max=k - 1)",
           ("tests/test_selection.py::test_position_codes_the_capped_sentence_index_and_ignores_content",)),
    Mutant("47: the bf16 gap measured against bf16 itself", "planner_lm/evaluation/scoring.py",
           "make_scorer(lm, table, test.first, device, precision),", 'make_scorer(lm, table, test.first, device, "bf16"),',
           ("tests/test_reported_figures.py::test_bf16_figures_against_an_independent_fp32_recomputation",)),
    Mutant("48: a requested pair naming a run that was not evaluated is dropped silently", "planner_lm/pipeline/evaluate.py",
           "        if missing:\n            raise UserError(f\"pair {pair}", "        if False:\n            raise UserError(f\"pair {pair}",
           ("tests/test_evaluate_stage.py::test_bad_requests_are_clear_errors",)),
]


# 50-55: power, the noise floor and equal budgets (issue 31, items 1, 2, 4).
POWER = "tests/test_reported_power.py"
MUTANTS += [
    Mutant("50: the paired Δ's standard error without the ratio's residuals", "planner_lm/evaluation/power.py",
           "((diff - rate * tokens) ** 2).sum()", "((diff - diff.mean()) ** 2).sum()",
           (f"{POWER}::test_spread_resolvable_delta_noise_floor_and_verdicts_on_the_test_split",)),
    Mutant("51: a verdict ignores the noise floor", "planner_lm/evaluation/power.py",
           "if floor is not None and abs(change.value) <= floor:", "if False:",
           (f"{POWER}::test_verdict_needs_a_ci_excluding_zero_and_a_delta_above_the_noise_floor",)),
    Mutant("52: a null run that differs in more than its seed is accepted", "planner_lm/evaluation/power.py",
           "one.get(key) != two.get(key)", "False",
           (f"{POWER}::test_the_null_run_must_differ_only_in_its_seed",)),
    Mutant("53: held-out documents include copies of the run's own documents", "planner_lm/evaluation/texts.py",
           "and doc.text not in used_texts]", "]",
           (f"{POWER}::test_held_out_documents_are_the_unused_ones_and_carry_the_same_figures",)),
    Mutant("54: a warm start's total steps leave out its source's", "planner_lm/pipeline/finetune_joint.py",
           "return None if before is None else before + steps", "return steps",
           ("tests/test_joint.py::test_warm_started_stage_records_its_source",)),
    Mutant("55: another seed_everything leaves the adapters' initialisation as it was", "planner_lm/models/scale.py",
           "adapter_seed=seeding.adapter_seed() if adapter_seed is None else adapter_seed,", "adapter_seed=adapter_seed or 0,",
           ("tests/test_joint.py::test_seed_everything_also_seeds_the_adapters",)),
]

RESIDUAL, OPTIONS = "tests/test_residual_conditioning.py", "tests/test_option_effects.py"
MUTANTS += [  # the residual conditioning, its schedule and initialisation, and the ceiling probe (issue 30)
    Mutant("60: residual adapters start Xavier-initialised like the paper's", "planner_lm/models/conditioning.py",
           "            if residual:  # the plan starts", "            if False:  # the plan starts",
           (f"{RESIDUAL}::test_at_step_zero_every_code_source_gives_the_base_model",)),
    Mutant("61: the residual reads raw, uncentred actions", "planner_lm/models/conditioning.py",
           "action = action - self.code_centre[", "action = action + 0 * self.code_centre[",
           (f"{RESIDUAL}::test_the_residual_reads_centred_actions_so_the_mean_action_adds_only_the_shared_shift",)),
    Mutant("62: residual_lr also drives the shared shift", "planner_lm/lit/joint_setup.py",
           "code = {id(p) for p in [*module.lm.adapter_parameters(), *module.lm.codebook_parameters()]} - shared",
           "code = {id(p) for p in [*module.lm.adapter_parameters(), *module.lm.codebook_parameters()]}",
           (f"{OPTIONS}::test_residual_lr_and_weight_decay_act_on_the_codes_only",)),
    Mutant("63: the cosine schedule never warms up", "planner_lm/lit/schedules.py",
           "        if step < warmup:\n            return (step + 1) / warmup", "        if False:\n            pass",
           (f"{OPTIONS}::test_cosine_schedule_warms_up_then_decays_every_group_to_min_lr_ratio",)),
    Mutant("64: the hidden-state initialisation ignores its scale", "planner_lm/models/steering.py",
           "scale * directions[slot][seen].double()", "directions[slot][seen].double()",
           (f"{OPTIONS}::test_residual_init_starts_each_action_at_the_bases_own_direction",)),
    Mutant("65: the ceiling probe reports the worst alpha", "planner_lm/evaluation/ceiling.py",
           "best = min(sweep, key=lambda alpha: sweep[alpha].mean_nll)",
           "best = max(sweep, key=lambda alpha: sweep[alpha].mean_nll)",
           ("tests/test_ceiling.py::test_the_ceiling_probe_reports_what_plain_loops_recompute",)),
]

DOWNLOADS = "tests/test_downloads.py"
MUTANTS += [  # downloads: told first, top level only, pinned revisions, clones checked (issue 32 item 5)
    Mutant("70: a download is not announced", "planner_lm/model_files.py",
           "        _announce(what, repo, why, commit, top, sizes, cache_dir, force_download)\n",
           "        pass\n",
           (f"{DOWNLOADS}::test_a_base_named_by_a_download_is_announced_with_why_after_the_folders_own_checks",)),
    Mutant("71: the base of a download ignores local_files_only", "planner_lm/models/conditioned_files.py",
           "**{k: v for k, v in hub.items() if k in BASE_ONLY_HUB_OPTIONS}", "**{}",
           (f"{DOWNLOADS}::test_the_base_of_a_download_honours_local_files_only_and_a_given_base",)),
    Mutant("72: weights are checked against their config only after the base is fetched",
           "planner_lm/models/conditioning.py",
           "        check_config_shapes(save_dir / WEIGHTS_FILE, stated, asdict(settings))", "        pass",
           (f"{DOWNLOADS}::test_a_base_named_by_a_download_is_announced_with_why_after_the_folders_own_checks",)),
    Mutant("73: a carried base/ is fetched before the config is checked", "planner_lm/models/conditioned_files.py",
           "    check_config_shapes(folder / WEIGHTS_FILE, header_shapes(folder / WEIGHTS_FILE), config)\n", "",
           (f"{DOWNLOADS}::test_a_base_named_by_a_download_is_announced_with_why_after_the_folders_own_checks",)),
    Mutant("74: a download lists nested files", "planner_lm/model_files.py",
           'top = _selected(sizes, lambda path: "/" not in path)', "top = _selected(sizes, lambda path: True)",
           (f"{DOWNLOADS}::test_only_the_expected_top_level_files_are_fetched",)),
    Mutant("75: the download patterns match at any depth", "planner_lm/model_files.py",
           'TOP_LEVEL_ONLY = ["*/*"]', "TOP_LEVEL_ONLY: list[str] = []",
           (f"{DOWNLOADS}::test_only_the_expected_top_level_files_are_fetched",)),
    Mutant("76: a download is not recorded by its commit", "planner_lm/model_files.py",
           'return Fetched(folder, f"{repo}@{commit}", True)', "return Fetched(folder, repo, True)",
           (f"{DOWNLOADS}::test_the_revision_is_resolved_recorded_and_reused",)),
    Mutant("77: a recorded commit is not reused", "planner_lm/model_files.py",
           "    revision = pinned or revision\n", "    revision = revision\n",
           (f"{DOWNLOADS}::test_the_revision_is_resolved_recorded_and_reused",)),
    Mutant("78: a joint run records its Hub base unpinned", "planner_lm/data/joint_data.py",
           'else pin(lm, "base LM")', "else lm",
           (f"{DOWNLOADS}::test_a_joint_run_on_a_hub_base_records_its_commit_and_later_loads_get_those_weights",)),
    Mutant("79: an embed stage records its Hub encoder unpinned", "planner_lm/sentence_vectors.py",
           'return name if name in BUNDLED_ENCODERS else pin(name, "sentence encoder")', "return name",
           (f"{DOWNLOADS}::test_an_embed_stage_records_its_hub_encoders_commit",)),
    Mutant("80: a git clone of a Hub repository is trusted as a local folder", "planner_lm/model_files.py",
           'return (folder.expanduser() / ".git").exists() or cached_repo(folder) is not None',
           "return cached_repo(folder) is not None",
           (f"{DOWNLOADS}::test_a_clone_or_cache_snapshot_of_a_hub_repository_gets_a_downloads_checks",)),
    Mutant("81: a Hub cache snapshot is trusted as a local folder", "planner_lm/model_files.py",
           'return (folder.expanduser() / ".git").exists() or cached_repo(folder) is not None',
           'return (folder.expanduser() / ".git").exists()',
           (f"{DOWNLOADS}::test_a_clone_or_cache_snapshot_of_a_hub_repository_gets_a_downloads_checks",)),
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


def mutant_id(mutant: Mutant) -> str:
    """The short name before the colon, e.g. `5a` or `27`."""
    return mutant.name.split(":", 1)[0]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print every mutant's id, name and file, then exit")
    parser.add_argument("--only", default=None,
                        help="comma-separated mutant ids to run (e.g. 2,5a,27); default: all")
    parser.add_argument("--tests", nargs="+", default=None,
                        help="run these tests against each selected mutant instead of its targeted ones "
                             "(to find which tests catch a new mutant)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for mutant in MUTANTS:
            print(f"{mutant_id(mutant):>4}  {mutant.file}  {mutant.name.split(': ', 1)[-1]}")
        return 0
    selected = MUTANTS
    if args.only:
        wanted = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = sorted(set(wanted) - {mutant_id(m) for m in MUTANTS})
        if unknown:
            raise SystemExit(f"unknown mutant id(s) {', '.join(unknown)}; `--list` shows them")
        selected = [m for m in MUTANTS if mutant_id(m) in wanted]
    if args.tests:
        selected = [Mutant(m.name, m.file, m.old, m.new, tuple(args.tests)) for m in selected]
    untargeted = [m.name for m in selected if not m.tests]
    if untargeted:  # pytest with no arguments would run the whole suite and count as a check
        raise SystemExit(f"mutant(s) without targeted tests: {'; '.join(untargeted)}")
    with tempfile.TemporaryDirectory(prefix="mutants-") as folder:
        tree = Path(folder)
        copy_tree(tree)
        for mutant in MUTANTS:  # every snippet still applies, before minutes of tests
            mutated(tree, mutant)
        tests = tuple(dict.fromkeys(t for m in selected for t in m.tests))
        code, detail = run_tests(tree, tests)
        if code != 0:
            print(f"the targeted tests fail on the unmutated code; fix them first:\n  {detail}")
            return 1
        results = {}
        for mutant in selected:
            results[mutant.name], detail = check(tree, mutant)
            print(f"{results[mutant.name]:>9}  {mutant.name}", *detail.splitlines(), sep="\n           ", flush=True)
    survivors = [name for name, result in results.items() if result != "killed"]
    print(f"{len(results) - len(survivors)}/{len(results)} mutants killed" +
          (f"; not killed: {', '.join(survivors)}" if survivors else ""))
    return 1 if survivors else 0

if __name__ == "__main__":
    sys.exit(main())
