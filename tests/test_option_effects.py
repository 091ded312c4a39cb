"""Every option that changes the model, and the test that shows its documented effect.

(table filled in below)
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import torch_threads
from fixtures_stages import load_stage, make_fake_upstream, write_fake_lm, write_fake_planner
from planner_lm.data.joint_data import JointDataModule
from planner_lm.data.lm_windows import LMWindows
from planner_lm.lit.joint import JointPlannerLM
from planner_lm.models.conditioning import ActionConditionedLM
from planner_lm.pipeline.evaluate import EvaluateConfig, StructureConfig, evaluate_runs
from planner_lm.run_folder import RunFolder, stage_dir

K, DIM, CONTEXT = 8, 16, 3
finetune_joint = load_stage("finetune_joint").run

# ----------------------------------------------------------------------------- the codes a run is scored with
TRAINED = ("soft", "gumbel", "straight_through", "hard", "oracle", "fixed", "boundary")
TEMPERATURE = 0.5  # not the default: a path that forgot the run's temperature would use 1.0


class LMCalls:
    """Every call of `ActionConditionedLM.forward`: the run the LM was loaded from (None: built in
    process), its input ids and the action weights it got."""

    def __init__(self, patch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str | None, torch.Tensor, torch.Tensor | None]] = []
        forward, load = ActionConditionedLM.forward, ActionConditionedLM.from_pretrained.__func__

        def spy(lm, input_ids=None, attention_mask=None, action_weights=None, labels=None, **kwargs):
            weights = None if action_weights is None else action_weights.detach().float().cpu().clone()
            self.calls.append((getattr(lm, "_test_run", None), input_ids.detach().cpu().clone(), weights))
            return forward(lm, input_ids, attention_mask, action_weights, labels, **kwargs)

        def loaded(cls, save_dir, *args, **kwargs):
            lm = load(cls, save_dir, *args, **kwargs)
            lm._test_run = Path(save_dir).parent.name
            return lm

        patch.setattr(ActionConditionedLM, "forward", spy)
        patch.setattr(ActionConditionedLM, "from_pretrained", classmethod(loaded))

    def take(self, run: str | None = None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """The calls recorded so far (of the LM loaded from `run`, default all), which are then forgotten."""
        taken = [(ids, weights) for name, ids, weights in self.calls if run is None or name == run]
        self.calls = [call for call in self.calls if not (run is None or call[0] == run)]
        return taken


def weights_for(calls, ids: torch.Tensor) -> torch.Tensor | None:
    """The weights `[len(ids), K]` the LM was given on the window that starts with exactly `ids`."""
    found = [(w, row) for seen, w in calls for row in range(len(seen))
             if len(seen[row]) >= len(ids) and torch.equal(seen[row, : len(ids)], ids)]
    assert found, "the LM never saw this document"
    weights, row = found[-1]
    return None if weights is None else weights[row, : len(ids)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run folder with a tiny joint run of every selection in `TRAINED` (2 steps each, in the
    stage's default precision, temperature 0.5), the module of each as it ended training (the
    weights it hands off), and the LM calls of one `evaluate` of them all (float32)."""
    run = make_fake_upstream(tmp_path_factory.mktemp("codes"), num_docs=20, sentences_per_doc=(2, 5), dim=DIM, k=K)
    write_fake_lm(run)
    write_fake_planner(run, K, DIM, CONTEXT)
    modules: dict[str, JointPlannerLM] = {}
    export = JointPlannerLM.select_export_weights

    def keep(self):
        modules[self.selection] = self
        return export(self)

    with pytest.MonkeyPatch.context() as patch, torch_threads(1):
        patch.setattr(JointPlannerLM, "select_export_weights", keep)
        for selection in TRAINED:
            finetune_joint(["--run_dir", str(run), "--model.selection", selection, "--model.conditioned_layers", "[2, 3]",
                            "--model.temperature", str(TEMPERATURE), "--model.lr", "1e-2", "--data.window", "24",
                            "--data.batch_size", "4", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
                            "--trainer.enable_progress_bar", "false"])
        calls = LMCalls(patch)
        evaluate_runs(EvaluateConfig(run_dir=str(run), runs=list(TRAINED), code_sources=["matched"], window=64,
                                     stride=63, batch_size=1, bootstrap_samples=10, structure=StructureConfig(docs=0),
                                     device="cpu"))
        evaluated = {selection: calls.take(f"4_joint-{selection}") for selection in TRAINED}
    return run, modules, evaluated


def stored_encoder(run: Path):
    """The run's sentence encoder as the embed stage saw it: each prepared sentence's stored vector."""
    folder = RunFolder(run)
    vectors = torch.from_numpy(np.asarray(folder.embeddings(), dtype=np.float32))
    rows = {}
    for split in ("train", "val", "test"):
        lo, _ = folder.prepared.sentence_range(split)
        for offset, text in enumerate(folder.prepared.sentence_texts(split)):
            rows[text] = lo + offset
    return lambda texts: vectors[[rows[t] for t in texts]] if texts else torch.zeros(0, DIM)


def document_batches(run: Path) -> tuple[JointDataModule, list[tuple[str, dict[str, torch.Tensor], int]]]:
    """Each test document as the training step's data path batches it: (text, batch, tokens)."""
    data = JointDataModule(run_dir=str(run), window=64, batch_size=1)
    data.setup("fit")
    windows = LMWindows(data._tokens("test"), window=64, stride=63, pad_token_id=data.pad_token_id)
    texts = data.prepared.split("test")["text"]
    assert len(windows) == len(texts), "a test document does not fit one window"
    return data, [(text, data.collate([windows[i]]), int(windows[i]["attention_mask"].sum()))
                  for i, text in enumerate(texts)]


@pytest.mark.parametrize("selection", TRAINED)
def test_evaluation_and_harness_give_the_lm_the_codes_it_was_trained_with(trained, selection, monkeypatch, one_thread):
    """On each test document, the action weights the LM receives in the evaluate stage and in the
    harness equal those the training step computes on a window holding that document: same
    planner (the run's tuned one, not the pretrained one), same temperature, the same code at
    each token (that of the next token's sentence). float32 in all three paths (the weights are
    computed outside autocast), so the tolerance is float32 noise."""
    import planner_lm.sentence_vectors
    from planner_lm.models.planner import Planner
    from planner_lm.planned_scoring import PlannedLM

    run, modules, evaluated = trained
    module = modules[selection]
    module.train(selection != "gumbel")  # gumbel: its validation step (training adds Gumbel noise)
    calls = LMCalls(monkeypatch)
    monkeypatch.setattr(planner_lm.sentence_vectors, "load_sentence_encoder", lambda settings, device: stored_encoder(run))
    harness = PlannedLM(stage_dir(run, "finetune_joint", selection), device="cpu", max_length=64)
    _, batches = document_batches(run)
    for text, batch, length in batches:
        ids = batch["input_ids"][0, :length]
        with torch.no_grad():
            module(batch)
        expected = weights_for(calls.take(), ids)
        torch.testing.assert_close(weights_for(evaluated[selection], ids), expected, rtol=0, atol=1e-5)
        harness.rolling_loglikelihood(text)
        harnessed = weights_for(calls.take(), ids)
        if selection == "oracle":
            # new text has no k-means codes: the harness follows a planner's argmax (documented)
            assert ((harnessed == 0) | (harnessed == 1)).all() and (harnessed.sum(-1) == 1).all()
        else:
            torch.testing.assert_close(harnessed, expected, rtol=0, atol=1e-5)
        if selection in ("soft", "gumbel"):
            # the check can fail: the pretrained planner, or the default temperature, give other codes
            with torch.no_grad():
                tuned, pretrained = module.planner, Planner.from_pretrained(stage_dir(run, "pretrain_planner"))
                module.planner = pretrained.train(module.training)
                with_pretrained = module.action_weights(batch)[0][0, :length]
                module.planner, module.hparams.temperature = tuned, 1.0
                at_default_temperature = module.action_weights(batch)[0][0, :length]
                module.hparams.temperature = TEMPERATURE
            assert (with_pretrained - expected).abs().max() > 1e-3
            assert (at_default_temperature - expected).abs().max() > 1e-3
