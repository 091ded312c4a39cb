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


def _fake_evaluation(run_dir, soft_vs_fixed: tuple[float, float, float], top1: float, previous: float) -> None:
    def cell(value: float, low: float, high: float) -> dict[str, float]:
        return {"value": value, "low": low, "high": high}

    rows = [{"run": "oracle", "matched": True, "vs_fixed": cell(-0.01, -0.012, -0.008)},
            {"run": "soft", "matched": True, "vs_fixed": cell(*soft_vs_fixed), "vs_boundary": cell(-0.005, -0.007, -0.003)},
            {"run": "soft", "matched": False, "vs_fixed": cell(0.5, 0.4, 0.6)}]  # another code source: ignored
    metrics = {"rows": rows, "planner": {"pretrained": {"top1": top1}}, "planner_baselines": {"previous_top1": previous}}
    (run_dir / "5_eval").mkdir(parents=True)
    (run_dir / "5_eval" / "metrics.json").write_text(__import__("json").dumps(metrics))


def test_verdicts_across_seeds_agree_or_say_they_flip(tmp_path, capsys):
    from planner_lm.evaluation import compare

    _fake_evaluation(tmp_path / "a", (-0.006, -0.008, -0.004), top1=0.373, previous=0.335)
    _fake_evaluation(tmp_path / "b", (-0.002, -0.004, 0.001), top1=0.344, previous=0.324)
    rows = {row["question"]: row for row in compare.verdict_rows([tmp_path / "a", tmp_path / "b"])}
    assert rows["oracle vs fixed"]["verdict"] == "helps" and rows["soft vs boundary"]["verdict"] == "helps"
    soft = rows["soft vs fixed"]
    assert soft["verdict"] == "flips: helps, no difference"  # the second CI includes 0
    assert soft["cells"][0] == "-0.60% [-0.80%, -0.40%]" and soft["mean"] == "-0.40%" and soft["spread"] == "0.40%"
    lead = rows["planner top-1 lead over copying"]
    assert lead["cells"] == ["+3.8%", "+2.0%"] and lead["verdict"] == "flips: better, under 3% points"
    assert compare.main(["--verdicts", str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "seed 42", "seed 43"]) == 0
    assert "| question | seed 42 | seed 43 | mean | spread | verdict |" in capsys.readouterr().out
    assert compare.main(["--verdicts", str(tmp_path / "a"), "--labels", "x", "y"]) == 2


def test_verdicts_leave_out_a_folder_that_only_retrained_its_planner(tmp_path, monkeypatch):
    """The other-precision check retrains only the planner on slow hosts: its column answers the
    planner question (from the planner stage) and leaves the perplexity questions unmeasured."""
    from planner_lm.evaluation import compare

    _fake_evaluation(tmp_path / "a", (-0.006, -0.008, -0.004), top1=0.373, previous=0.335)
    (tmp_path / "b").mkdir()
    monkeypatch.setattr(compare, "planner_lead", lambda folder: (0.344, 0.324))
    rows = {row["question"]: row for row in compare.verdict_rows([tmp_path / "a", tmp_path / "b"])}
    assert rows["soft vs fixed"]["cells"] == ["-0.60% [-0.80%, -0.40%]", "–"]
    assert rows["soft vs fixed"]["verdict"] == "helps (1 of 2 measured)" and rows["soft vs fixed"]["spread"] == "–"
    lead = rows["planner top-1 lead over copying"]
    assert lead["cells"] == ["+3.8%", "+2.0%"] and lead["verdict"] == "flips: better, under 3% points"
