"""The ceiling probe's figures, recomputed from the saved run by plain loops.

A tiny `fixed` run goes through the REAL `stages/evaluate.py` entry point with the probe on. The
test then rebuilds the per-action directions from hidden states it captures itself (one forward
pass per whole document), scores validation and test with the steering added by its own hook, and
checks every reported number: the sweep, the chosen α, the test PPL and the paired Δ.

Precision: fp32 on both sides (`--precision 32`); relative 1e-5 on perplexities, absolute 1e-5 on
the paired Δ (the same tolerances as tests/test_reported_figures.py). The test also asserts that
steering moves validation PPL by far more than that, so it cannot pass because nothing moved.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import torch_threads
from fixtures_stages import load_stage, make_fake_upstream, word_tokenizer, write_fake_lm
from test_evaluate_stage import hash_encoder
from test_reported_figures import DIM, K, RTOL, ATOL_DELTA, Corpus, _write_joint_run, tokens_of
from planner_lm.evaluation.bootstrap import relative_change_interval, resample_indices
from planner_lm.run_folder import stage_dir

ALPHAS = (1.0, 8.0, 32.0)
FIT_DOCS, WINDOW = 20, 128  # every document fits one window: whole-document forward passes below
FIXED = torch.eye(K)[0]  # the fixed code: action 0

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> tuple[Path, dict]:
    import planner_lm.sentence_vectors

    run = make_fake_upstream(tmp_path_factory.mktemp("ceiling"), num_docs=60, sentences_per_doc=(1, 8), dim=DIM,
                             k=K, action_words=True)
    tokenizer = word_tokenizer()
    write_fake_lm(run, tokenizer=tokenizer)
    _write_joint_run(run, "fixed", tokenizer, planner=False, seed=3)
    args = ["--run_dir", str(run), "--window", str(WINDOW), "--stride", str(WINDOW - 1), "--batch_size", "8",
            "--bootstrap_samples", "300", "--seed", "0", "--device", "cpu", "--precision", "32",
            "--structure.docs", "0", "--runs", "[fixed]", "--code_sources", "[matched]",
            "--ceiling.alphas", json.dumps(list(ALPHAS)), "--ceiling.fit_docs", str(FIT_DOCS)]
    with pytest.MonkeyPatch.context() as patch, torch_threads(1):
        patch.setattr(planner_lm.sentence_vectors, "load_sentence_encoder", lambda settings, device: hash_encoder)
        load_stage("evaluate").main(args)
    return run, json.loads((stage_dir(run, "evaluate") / "metrics.json").read_text())


def _documents(run: Path, split: str, limit: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(token ids, target-sentence action per position) of each document of `split`."""
    corpus, tokenizer = Corpus(run, split), word_tokenizer()
    out = []
    for doc in corpus.docs[:limit]:
        ids, next_sentence = tokens_of(tokenizer, doc["text"], doc["sent_end"])
        assert len(ids) <= WINDOW
        out.append((ids, [int(corpus.actions[doc["first_sentence"] + s]) for s in next_sentence]))
    return out


@torch.no_grad()
def _directions(lm, documents) -> torch.Tensor:
    """Mean site input per action minus the overall mean, from hidden states captured here."""
    sums = torch.zeros(len(lm.sites()), K, lm.adapters[0].out_features, dtype=torch.float64)
    counts = torch.zeros(K, dtype=torch.float64)
    captured: dict[int, torch.Tensor] = {}
    handles = [site.register_forward_pre_hook(lambda m, a, slot=slot: captured.__setitem__(slot, a[0][0]),
                                              prepend=True) for slot, site in enumerate(lm.sites())]
    for ids, actions in documents:
        lm(input_ids=torch.tensor([ids]), action_weights=FIXED.expand(1, len(ids), K))
        for t, action in enumerate(actions):
            counts[action] += 1
            for slot in captured:
                sums[slot, action] += captured[slot][t].double()
    for handle in handles:
        handle.remove()
    overall = sums.sum(1, keepdim=True) / counts.sum()
    directions = sums / counts.clamp(min=1).view(1, -1, 1) - overall
    return torch.where(counts.view(1, -1, 1) > 0, directions, torch.zeros_like(directions))


@torch.no_grad()
def _doc_nll(lm, documents, directions: torch.Tensor, alpha: float) -> np.ndarray:
    """Summed NLL of tokens 1..n-1 of each document, steered by alpha x the target action's direction."""
    current: dict[str, list[int]] = {}

    def steer(slot):
        return lambda m, a: (a[0] + alpha * directions[slot][current["actions"]].float()[None], *a[1:])

    handles = [site.register_forward_pre_hook(steer(slot)) for slot, site in enumerate(lm.sites())]
    sums = []
    for ids, actions in documents:
        current["actions"] = actions
        logits = lm(input_ids=torch.tensor([ids]), action_weights=FIXED.expand(1, len(ids), K)).logits[0].double()
        logprobs = torch.log_softmax(logits, -1)
        sums.append(-sum(float(logprobs[t - 1, ids[t]]) for t in range(1, len(ids))))
    for handle in handles:
        handle.remove()
    return np.array(sums)


def _ppl(doc_nll: np.ndarray, documents) -> float:
    return math.exp(doc_nll.sum() / sum(len(ids) - 1 for ids, _ in documents))


def test_the_ceiling_probe_reports_what_plain_loops_recompute(probed):
    from planner_lm.models.conditioning import ActionConditionedLM

    run, metrics = probed
    probe = metrics["ceiling"]
    lm = ActionConditionedLM.from_pretrained(stage_dir(run, "finetune_joint", "fixed") / "lm").eval()
    fit = _documents(run, "train", FIT_DOCS)
    directions = _directions(lm, fit)
    assert probe["fit_docs"] == FIT_DOCS and probe["fit_tokens"] == sum(len(ids) for ids, _ in fit)

    val = _documents(run, "val")
    sweep = {alpha: _ppl(_doc_nll(lm, val, directions, alpha), val) for alpha in (0.0, *ALPHAS)}
    assert probe["val_ppl"].keys() == {f"{a:g}" for a in sweep}
    for alpha, ppl in sweep.items():
        assert probe["val_ppl"][f"{alpha:g}"] == pytest.approx(ppl, rel=RTOL)
    assert abs(sweep[ALPHAS[-1]] / sweep[0.0] - 1) > 100 * RTOL  # steering moves the figures
    best = min(sweep, key=sweep.get)
    assert probe["best_alpha"] == best

    test = _documents(run, "test")
    own = _doc_nll(lm, test, directions, 0.0)
    steered = _doc_nll(lm, test, directions, best)
    tokens = np.array([len(ids) - 1 for ids, _ in test])
    assert probe["own_test_ppl"] == pytest.approx(_ppl(own, test), rel=RTOL)
    assert probe["test_ppl"] == pytest.approx(_ppl(steered, test), rel=RTOL)
    delta = relative_change_interval(steered, own, tokens, resample_indices(len(test), 300, 0))
    for key in ("value", "low", "high"):
        assert probe["delta"][key] == pytest.approx(getattr(delta, key), abs=ATOL_DELTA)
    results = (stage_dir(run, "evaluate") / "results.md").read_text()
    assert "Ceiling probe" in results and f"Best α {best:g}" in results


def test_a_ceiling_probe_on_a_run_not_evaluated_is_a_one_line_error(probed, capsys):
    run, _ = probed
    with pytest.raises(SystemExit) as exit_info:
        load_stage("evaluate").main(["--run_dir", str(run), "--runs", "[fixed]", "--ceiling.run", "oracle",
                                     "--ceiling.alphas", "[1.0]", "--overwrite", "true", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "ceiling.run oracle: no evaluated run" in capsys.readouterr().err
