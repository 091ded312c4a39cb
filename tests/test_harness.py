"""Scoring arbitrary text with a joint run (planner in the loop) and the lm-evaluation-harness adapter."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from test_evaluate_stage import config, fake_joint_runs, hash_encoder
from planner_lm.corpus import CorpusConfig
from planner_lm.pipeline.evaluate import StructureConfig, evaluate_runs
from planner_lm.run_folder import stage_dir

TEXT = "Sentence 1 of document 3. Sentence 2 of document 3. Sentence 3 of document 3. The end of it."


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return fake_joint_runs(tmp_path_factory.mktemp("harness"), ("soft", "fixed"), num_docs=20, sentences_per_doc=(2, 5))


@pytest.fixture
def planned(run_dir, monkeypatch):
    import planner_lm.sentence_vectors
    from planner_lm.planned_scoring import PlannedLM

    monkeypatch.setattr(planner_lm.sentence_vectors, "load_sentence_encoder", lambda settings, device: hash_encoder)
    return lambda selection, **kw: PlannedLM(stage_dir(run_dir, "finetune_joint", selection), device="cpu", **kw)


def test_planned_scoring_matches_the_evaluate_stage_on_the_same_text(run_dir, planned, tmp_path):
    """One document scored by the harness path and by `make evaluate EVAL_CORPUS=...`: same plan,
    same conditioning, same windows, so the same log-likelihood (the stage stores vectors as fp16)."""
    corpus = tmp_path / "one.jsonl"
    corpus.write_text(json.dumps({"text": TEXT}) + "\n")
    metrics = evaluate_runs(config(run_dir, runs=["soft"], window=16, stride=15, code_sources=["matched"],
                                   corpus=CorpusConfig(name=str(corpus)), structure=StructureConfig(docs=0)),
                            encoder=hash_encoder)
    row = next(r for r in metrics["rows"] if r["run"] == "soft" and r["matched"])
    rolling = planned("soft", max_length=16).rolling_loglikelihood(TEXT)
    assert rolling == pytest.approx(-row["nll"] * row["tokens"], rel=1e-3)
    # the plan matters: the same text with the planner-free control scores differently
    assert planned("fixed", max_length=16).rolling_loglikelihood(TEXT) != pytest.approx(rolling, rel=1e-6)


def test_continuation_loglikelihood_is_the_difference_of_prefix_scores(planned):
    model = planned("fixed")
    context, continuation = "Sentence 1 of document 3. Sentence 2", " of document 3."
    logprob, greedy = model.loglikelihood(context, continuation)
    expected = model.rolling_loglikelihood(context + continuation) - model.rolling_loglikelihood(context)
    assert logprob == pytest.approx(expected, abs=1e-4) and logprob < 0
    assert isinstance(greedy, bool)
    text = model.generate("Sentence 1 of document 3.", until=["document"], max_new_tokens=12)
    assert isinstance(text, str) and "document" not in text


def test_harness_runs_a_local_perplexity_task(run_dir, planned, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from planner_lm.harness import TEXT_TASK, PlannerHarnessLM, main, write_text_task

    import planner_lm.sentence_vectors

    monkeypatch.setattr(planner_lm.sentence_vectors, "load_sentence_encoder", lambda settings, device: hash_encoder)
    texts = [TEXT, "Sentence 1 of document 9. Sentence 2 of document 9."]
    task_dir = write_text_task(texts, tmp_path / "task")
    model = PlannerHarnessLM.create_from_arg_string(f"run={stage_dir(run_dir, 'finetune_joint', 'soft')},device=cpu")
    results = lm_eval.simple_evaluate(model=model, tasks=[TEXT_TASK], task_manager=TaskManager(include_path=str(task_dir)))
    scores = results["results"][TEXT_TASK]
    total = sum(model.model.rolling_loglikelihood(t) for t in texts)
    words = sum(len(t.split()) for t in texts)
    assert scores["word_perplexity,none"] == pytest.approx(math.exp(-total / words), rel=1e-4)
    # the offline task writer of the command line
    main(["task", str(run_dir), str(tmp_path / "run_task")])
    assert (tmp_path / "run_task" / f"{TEXT_TASK}.yaml").is_file()


def test_harness_model_args_errors_are_one_line(run_dir):
    pytest.importorskip("lm_eval")
    from planner_lm.errors import UserError
    from planner_lm.harness import PlannerHarnessLM

    with pytest.raises(UserError, match="run="):
        PlannerHarnessLM.create_from_arg_string("device=cpu")
    with pytest.raises(UserError, match="not a finished joint run"):
        PlannerHarnessLM.create_from_arg_string(f"run={stage_dir(run_dir, 'finetune_joint', 'hard')}")


def test_planner_lm_eval_command_scores_a_local_task(run_dir, tmp_path, monkeypatch, capsys):
    """`planner-lm-eval` takes lm-eval's own options, with the `planner-lm` model registered."""
    pytest.importorskip("lm_eval")
    import planner_lm.sentence_vectors
    from planner_lm.commands import harness_main
    from planner_lm.harness import TEXT_TASK, write_text_task

    monkeypatch.setattr(planner_lm.sentence_vectors, "load_sentence_encoder", lambda settings, device: hash_encoder)
    task_dir = write_text_task([TEXT, "Sentence 1 of document 9. Sentence 2 of document 9."], tmp_path / "task")
    run = stage_dir(run_dir, "finetune_joint", "soft")
    harness_main(["--model", "planner-lm", "--model_args", f"run={run}", "--device", "cpu", "--tasks", TEXT_TASK,
                  "--include_path", str(task_dir), "--output_path", str(tmp_path / "out")])
    assert TEXT_TASK in capsys.readouterr().out  # the harness's own results table
    written = list((tmp_path / "out").rglob("results*.json"))
    assert len(written) == 1
    scores = json.loads(written[0].read_text())["results"][TEXT_TASK]
    assert math.isfinite(scores["word_perplexity,none"]) and scores["word_perplexity,none"] > 1
    with pytest.raises(SystemExit) as stopped:  # a missing run= is one line, exit 2
        harness_main(["--model", "planner-lm", "--model_args", "device=cpu", "--tasks", TEXT_TASK,
                      "--include_path", str(task_dir)])
    assert stopped.value.code == 2 and "run=" in capsys.readouterr().err


def test_simple_evaluate_snippet_of_the_readme(run_dir, tmp_path, monkeypatch):
    """The README's Python example, as written there (paths substituted)."""
    pytest.importorskip("lm_eval")
    import planner_lm.sentence_vectors
    from planner_lm.harness import write_text_task

    monkeypatch.setattr(planner_lm.sentence_vectors, "load_sentence_encoder", lambda settings, device: hash_encoder)
    write_text_task([TEXT], tmp_path / "harness")
    snippet = README_SNIPPET.replace("runs/demo/4_joint-soft", str(stage_dir(run_dir, "finetune_joint", "soft")))
    snippet = snippet.replace("runs/demo/harness", str(tmp_path / "harness"))
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 - the documented example itself
    assert math.isfinite(scope["ppl"]) and scope["ppl"] > 1


README_SNIPPET = '''
import lm_eval
from lm_eval.tasks import TaskManager
from planner_lm.harness import PlannerHarnessLM

model = PlannerHarnessLM(run="runs/demo/4_joint-soft", device="cpu")
results = lm_eval.simple_evaluate(model=model, tasks=["planner_lm_text"],
                                  task_manager=TaskManager(include_path="runs/demo/harness"))
ppl = results["results"]["planner_lm_text"]["word_perplexity,none"]
print(f"word perplexity {ppl:.2f}")
'''
