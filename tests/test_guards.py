"""Guards behind `make mutants`: each reported number recomputed another way, or a documented
behaviour asserted, where no other test would notice a plausible break (tests/mutants.py 19-39).

Precision: everything here runs the tiny models in fp32 on the CPU (the evaluate stage's
`precision` default "32" is not the training precision), so tolerances are fp32 ones.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from planner_lm.evaluation.bootstrap import Interval, ppl_interval, relative_change_interval, resample_indices
from planner_lm.evaluation.planner_metrics import action_baselines, planner_scores
from planner_lm.evaluation.report import Column, results_markdown
from planner_lm.evaluation.structure import rouge2_f


# ------------------------------------------------------------------ bootstrap intervals
def _documents(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(10, 100, size=n)
    nll = tokens * rng.normal(3.0, 0.4, size=n)
    other = nll + tokens * rng.normal(0.02, 0.05, size=n)
    return nll, other, tokens


def test_ppl_interval_is_the_2_5_and_97_5_percentiles_of_the_resampled_ppls():
    nll, _, tokens = _documents()
    indices = resample_indices(len(nll), 400, seed=3)
    resampled = np.array([math.exp(nll[i].sum() / tokens[i].sum()) for i in indices])
    for confidence, (lo, hi) in ((0.95, (2.5, 97.5)), (0.8, (10.0, 90.0))):
        interval = ppl_interval(nll, tokens, indices, confidence)
        assert interval.low == pytest.approx(np.percentile(resampled, lo), rel=1e-9)
        assert interval.high == pytest.approx(np.percentile(resampled, hi), rel=1e-9)
    inside = np.mean((resampled >= ppl_interval(nll, tokens, indices).low)
                     & (resampled <= ppl_interval(nll, tokens, indices).high))
    assert 0.94 <= inside <= 0.96


def test_relative_change_is_paired_on_the_same_resampled_documents():
    nll, other, tokens = _documents()
    indices = resample_indices(len(nll), 400, seed=4)
    ratios = np.array([math.exp((other[i].sum() - nll[i].sum()) / tokens[i].sum()) - 1 for i in indices])
    interval = relative_change_interval(other, nll, tokens, indices)
    assert interval.value == pytest.approx(math.exp((other.sum() - nll.sum()) / tokens.sum()) - 1, rel=1e-9)
    assert interval.low == pytest.approx(np.percentile(ratios, 2.5), rel=1e-7)
    assert interval.high == pytest.approx(np.percentile(ratios, 97.5), rel=1e-7)


# ------------------------------------------------------------------ planner accuracy and baselines
def test_planner_scores_recomputed_by_hand():
    k = 8
    # the true action is ranked 1st, 3rd, 5th and 6th
    logits = torch.tensor([[9.0, 8, 7, 6, 5, 4, 3, 2]] * 4)
    targets = torch.tensor([0, 2, 4, 5])
    scores = planner_scores(logits, targets)
    assert scores["top1"] == pytest.approx(0.25)
    assert scores["top5"] == pytest.approx(0.75)
    assert scores["mean_rank"] == pytest.approx((1 + 3 + 5 + 6) / 4)
    log_z = math.log(sum(math.exp(v) for v in range(2, 10)))
    assert scores["nll"] == pytest.approx(np.mean([log_z - logits[0, t].item() for t in targets]), rel=1e-5)
    assert k == logits.shape[1]


def test_content_free_baselines_copy_the_previous_sentence_and_learn_bigrams_from_training_only():
    # training document 0 1 2 0 1 2 (transitions start->0, 0->1, 1->2, 2->0); scored document 1 2 0
    actions = np.array([0, 1, 2, 0, 1, 2, 1, 2, 0])
    doc_first = np.array([0] * 6 + [6] * 3)
    result = action_baselines(actions, np.arange(6), np.arange(6, 9), doc_first, num_actions=3)
    # copy: start -> majority 0 (ties by id; target 1), 1 -> 1 (target 2), 2 -> 2 (target 0): never right
    assert result["previous_top1"] == 0.0
    # bigram of the training document: start -> 0 (wrong), 1 -> 2 (right), 2 -> 0 (right)
    assert result["bigram_top1"] == pytest.approx(2 / 3)
    assert result["majority_top1"] == pytest.approx(1 / 3)


# ------------------------------------------------------------------ the table
def test_a_change_is_marked_whenever_its_interval_excludes_zero_in_either_direction():
    column = Column("vs", "Δ", fmt="{:+.2%}", show_interval=True, mark_nonzero=True)
    rows = [{"label": "worse", "vs": Interval(0.01, 0.005, 0.02)},
            {"label": "better", "vs": Interval(-0.01, -0.02, -0.005)},
            {"label": "unclear", "vs": Interval(0.001, -0.001, 0.003)}]
    lines = results_markdown(rows, [column]).splitlines()[2:]
    marked = [line.split(" | ")[0].strip("| ") for line in lines if line.rstrip(" |").endswith("\\*")]
    assert marked == ["worse", "better"]


# ------------------------------------------------------------------ structure metrics
def test_rouge2_is_the_f_measure_of_bigram_precision_and_recall():
    # one shared bigram: precision 1/1, recall 1/4 -> F = 2PR / (P + R) = 0.4, the same both ways round
    assert rouge2_f("green apples", "green apples fall from trees") == pytest.approx(0.4)
    assert rouge2_f("green apples fall from trees", "green apples") == pytest.approx(0.4)


# ------------------------------------------------------------------ corpus evaluation: actions of new text
def test_sentences_of_another_corpus_get_their_own_nearest_centroid(tmp_path):
    from fixtures_stages import make_fake_upstream
    from planner_lm.evaluation.texts import encode_and_assign
    from planner_lm.run_folder import RunFolder
    from test_evaluate_stage import hash_encoder

    folder = RunFolder(make_fake_upstream(tmp_path, num_docs=10, dim=16, k=8))
    # lengths out of order, so the length-sorted encoding chunk is a permutation of the input
    sentences = [("word " * n).strip() + f" {n}." for n in (9, 2, 14, 5, 1, 11, 3, 7, 12, 4, 8, 6)]
    vectors, actions = encode_and_assign(folder, sentences, tmp_path / "cache", torch.device("cpu"), hash_encoder)
    expected_vectors = hash_encoder(sentences).numpy()
    np.testing.assert_allclose(np.asarray(vectors, np.float32), expected_vectors, atol=2e-3)
    codebook = folder.codebook()
    distances = ((expected_vectors[:, None, :] - codebook[None]) ** 2).sum(-1)
    assert actions.tolist() == distances.argmin(1).tolist()
    assert len(set(actions.tolist())) > 1  # a permutation of one action would prove nothing


# ------------------------------------------------------------------ the evaluate stage's table, recomputed
def test_evaluation_table_recomputed_from_each_runs_own_codes(tmp_path):
    """PPL, its CI, Δ vs boundary and PPL by length of the soft and boundary rows, recomputed with a
    plain forward pass over whole documents (one window covers each): soft codes from the run's own
    planner (not the pretrained one), boundary codes alternating by sentence within each document."""
    from planner_lm.data.contexts import gather_contexts
    from planner_lm.models.conditioning import ActionConditionedLM
    from planner_lm.models.planner import Planner
    from planner_lm.pipeline.evaluate import StructureConfig, evaluate_runs
    from planner_lm.run_folder import RunFolder
    from planner_lm.tokenization import load_tokenizer, tokenize_documents
    from test_evaluate_stage import K, config, fake_joint_runs, hash_encoder

    run = fake_joint_runs(tmp_path, ("soft", "boundary"), num_docs=120, sentences_per_doc=(1, 6))
    with torch.random.fork_rng():
        metrics = evaluate_runs(config(run, runs=["soft", "boundary"], window=64, stride=63, code_sources=["matched"],
                                       bootstrap_samples=100, structure=StructureConfig(docs=0)), encoder=hash_encoder)
    folder = RunFolder(run)
    split = folder.prepared.split("test")
    counts = [len(s) for s in split["sent_start"]]
    firsts = list(split["first_sentence"])
    assert any(f % 2 for f in firsts) and {1, 4} & set(counts)  # the checks below can tell the breaks apart
    docs = tokenize_documents(load_tokenizer("gpt2"), split["text"], split["sent_start"], split["sent_end"])
    assert max(len(d.input_ids) for d in docs) <= 64
    embeddings = torch.from_numpy(np.asarray(folder.embeddings(), np.float32))
    planner = Planner.from_pretrained(run / "4_joint-soft" / "planner").eval()

    def codes(selection: str, first: int, n: int) -> torch.Tensor:
        if selection == "boundary":
            return torch.nn.functional.one_hot(torch.arange(n) % 2, K).float()
        ids = first + torch.arange(n)
        context, mask = gather_contexts(embeddings, ids, torch.full((n,), first), planner.context_sentences)
        with torch.no_grad():
            return torch.softmax(planner(context, mask), -1)

    doc_nll = {}
    for selection in ("soft", "boundary"):
        lm = ActionConditionedLM.from_pretrained(run / f"4_joint-{selection}" / "lm").eval()
        sums = []
        for doc, first, n in zip(docs, firsts, counts):
            ids = torch.as_tensor(doc.input_ids, dtype=torch.long)
            weights = codes(selection, first, n)[torch.as_tensor(doc.target_sentence, dtype=torch.long).clamp(min=0)]
            with torch.no_grad():
                logits = lm(input_ids=ids[None], action_weights=weights[None]).logits[0]
            sums.append(float(torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum")))
        doc_nll[selection] = np.array(sums)
    tokens = np.array([len(d.input_ids) - 1 for d in docs])
    rows = {row["run"]: row for row in metrics["rows"] if row["matched"]}
    indices = resample_indices(len(docs), 100, seed=0)
    for selection in ("soft", "boundary"):
        nll = doc_nll[selection]
        assert rows[selection]["tokens"] == tokens.sum()
        assert rows[selection]["ppl"]["value"] == pytest.approx(math.exp(nll.sum() / tokens.sum()), rel=1e-4)
        resampled = [math.exp(nll[i].sum() / tokens[i].sum()) for i in indices]
        assert rows[selection]["ppl"]["low"] == pytest.approx(np.percentile(resampled, 2.5), rel=1e-4)
        assert rows[selection]["ppl"]["high"] == pytest.approx(np.percentile(resampled, 97.5), rel=1e-4)
        for label, (lo, hi) in {"1-3": (1, 3), "4-10": (4, 10)}.items():
            keep = np.array([lo <= c <= hi for c in counts])
            bucket = rows[selection]["by_length"][label]
            assert bucket["docs"] == keep.sum()
            assert bucket["ppl"] == pytest.approx(math.exp(nll[keep].sum() / tokens[keep].sum()), rel=1e-4)
    change = math.exp((doc_nll["soft"].sum() - doc_nll["boundary"].sum()) / tokens.sum()) - 1
    assert abs(change) > 1e-3
    assert rows["soft"]["vs_boundary"]["value"] == pytest.approx(change, rel=1e-3)


# ------------------------------------------------------------------ generation: the run's planner temperature
def test_generation_mixes_the_planners_codes_at_the_runs_temperature():
    from planner_lm.generation import PlannerGenerator, SamplingConfig
    from planner_lm.tokenization import load_tokenizer
    from test_generation import DIM, K, ScriptedLM, hash_encoder, tiny_planner

    tokenizer = load_tokenizer("gpt2")
    planner = tiny_planner()
    prompt = ["The Moon is bright.", "It shines."]
    # the planner's context for the sentence the prompt opens: both prompt sentences, right-aligned
    context = torch.zeros(1, planner.context_sentences, DIM)
    context[0, -2:] = hash_encoder(prompt)
    mask = torch.zeros(1, planner.context_sentences, dtype=torch.bool)
    mask[0, -2:] = True
    with torch.no_grad():
        logits = planner(context, mask)[0]
    for temperature in (0.3, 2.0):
        lm = ScriptedLM(tokenizer)
        generator = PlannerGenerator(lm, tokenizer, hash_encoder, K, planner=planner)
        generator.generate([" ".join(prompt)], config=SamplingConfig(max_new_tokens=1, temperature=0,
                                                                      selection="soft", planner_temperature=temperature))
        fed = lm.calls[0][1][0, -1]  # the prompt's final "." carries the code of the sentence it opens
        torch.testing.assert_close(fed, torch.softmax(logits / temperature, -1), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------ harness: the plan never reads the scored sentence
def test_harness_plans_each_sentence_from_the_sentences_before_it_only(tmp_path, monkeypatch):
    import planner_lm.sentence_vectors
    from planner_lm.planned_scoring import PlannedLM
    from test_evaluate_stage import fake_joint_runs, hash_encoder

    run = fake_joint_runs(tmp_path, ("soft",), num_docs=10)
    monkeypatch.setattr(planner_lm.sentence_vectors, "load_sentence_encoder", lambda settings, device: hash_encoder)
    planned = PlannedLM(run / "4_joint-soft", device="cpu")
    head = "The Moon is bright. It shines at night. "
    plans = {ending: planned.plan(head + ending).weights for ending in ("Stars are far.", "Cats sleep all day.")}
    first, second = plans.values()
    assert first.shape == second.shape == (3, planned.generator.num_actions)
    # the third sentence's code comes from the first two only: rewriting it leaves every code as it was
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    # while rewriting an earlier sentence moves the codes after it (the plan does read its context)
    other = planned.plan("The Moon is bright. Dogs bark loudly. Stars are far.").weights
    assert torch.equal(other[:2], first[:2]) and not torch.equal(other[2], first[2])
