"""The controls a reported figure is measured against mean what the table says they mean."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from planner_lm.evaluation.results import untouched_base_result
from planner_lm.evaluation.structure_eval import StructureEvaluator, StructureTask
from planner_lm.generation import SamplingConfig
from planner_lm.generation_plan import Generation, PlannedSentence


def _run(selection: str, base_mode: str, trained: bool) -> SimpleNamespace:
    return SimpleNamespace(selection=selection, manifest=SimpleNamespace(facts={"base_mode": base_mode, "trained": trained}))


def test_delta_vs_none_only_ever_uses_the_untouched_base_lm():
    results = {("none", "none"): "none-run", ("fixed", "none"): "fixed-without-actions",
               ("soft", "none"): "soft-without-actions"}
    # a `none` run that fine-tuned its base and runs whose base was fine-tuned are other LMs
    fine_tuned = [_run("none", "full", True), _run("fixed", "full", True), _run("soft", "lora", True)]
    assert untouched_base_result(fine_tuned, results) is None
    # a run with frozen base weights, scored without actions, is the untouched base
    frozen = [_run("fixed", "full", True), _run("soft", "frozen", True)]
    assert untouched_base_result(frozen, results) == "soft-without-actions"
    # the `none` run that trained nothing is preferred
    untouched = [_run("soft", "frozen", True), _run("none", "frozen", False)]
    assert untouched_base_result(untouched, results) == "none-run"


def test_plan_following_judges_every_run_conditioned_on_one_action_boundary_included():
    # the encoder maps a sentence "aN." to centroid N, so each sentence's own action is readable
    centroids = torch.eye(4)

    def encode(texts: list[str]) -> torch.Tensor:
        return torch.stack([centroids[int(t.strip()[1])] for t in texts])

    def generation(source: str, planned: list[int], written: list[int]) -> Generation:
        sentences = [PlannedSentence(f"a{w}.", p, float("nan"), source) for p, w in zip(planned, written)]
        return Generation("", " ".join(s.text for s in sentences), sentences, 10, stopped_at_eos=True)

    task = StructureTask(prompts=[""], references=["a0."], true_actions=[[0]])
    evaluator = StructureEvaluator(task, encode, centroids, SamplingConfig())
    # boundary alternates actions 0, 1, 0: two of three sentences follow it
    boundary = evaluator.score([generation("boundary", [0, 1, 0], [0, 1, 3])])
    assert boundary["judged_sentences"] == 3 and boundary["follow"] == 2 / 3
    fixed = evaluator.score([generation("fixed", [0, 0], [0, 2])])
    assert fixed["judged_sentences"] == 2 and fixed["follow"] == 0.5
    # uniform and the plain LM carry no single action: nothing to follow
    for source in ("uniform", "none"):
        scores = evaluator.score([generation(source, [-1, -1], [0, 1])])
        assert scores["judged_sentences"] == 0 and np.isnan(scores["follow"])
