"""Sliding-window perplexity, bootstrap intervals and structure metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from planner_lm.evaluation.bootstrap import (
    ppl_interval,
    relative_change_interval,
    resample_indices,
)
from planner_lm.evaluation.perplexity import (
    LINEAR_HEAD_FAMILIES,
    ScoringDocument,
    causal_lm_logprobs,
    next_token_logprobs,
    nll_by_position,
    plan_windows,
    position_in_sentence,
    sliding_window_nll,
)
from planner_lm.evaluation.structure import (
    edit_distance,
    normalized_edit_distance,
    plan_following_rate,
    rouge2_f,
)
from planner_lm.evaluation.scoring import make_scorer
from planner_lm.models.base_lm import tiny_config
from planner_lm.models.conditioning import ActionConditionedLM


@pytest.fixture(scope="module")
def tiny_lm() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=61, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config).eval()


def lm_scorer(model, calls=None):
    def score(ids, mask, cond, keep):
        if calls is not None:
            calls.append((ids.shape[1], keep))
        return causal_lm_logprobs(model, ids, mask, keep)

    return score


def random_documents(lengths, vocab=61, seed=0):
    gen = torch.Generator().manual_seed(seed)
    docs, next_sentence = [], 0
    for n in lengths:
        ids = torch.randint(1, vocab, (n,), generator=gen)
        # sentences of 5 tokens; condition id of token t = sentence of token t + 1
        sentence_of_token = next_sentence + torch.arange(n) // 5
        cond = torch.cat([sentence_of_token[1:], sentence_of_token[-1:]])
        docs.append(ScoringDocument(ids, cond))
        next_sentence = int(sentence_of_token[-1]) + 1
    return docs


def test_windows_cover_every_target_once():
    for window, stride in [(8, 1), (8, 3), (8, 7), (2, 1)]:
        windows = plan_windows([1, 5, 8, 9, 30], window, stride)
        for doc, length in enumerate([1, 5, 8, 9, 30]):
            targets = [t for w in windows if w.doc == doc for t in range(w.first_target, w.end)]
            assert sorted(targets) == list(range(1, length))
        assert all(w.end - w.start <= window for w in windows)
        # every target sees as much context as the window allows
        for w in windows:
            assert w.start == max(0, w.end - window)


def test_bad_window_arguments_are_rejected():
    with pytest.raises(ValueError):
        plan_windows([10], window=8, stride=8)
    with pytest.raises(ValueError):
        plan_windows([10], window=1, stride=1)


def test_ppl_equals_exp_of_mean_nll_computed_by_hand(tiny_lm):
    docs = random_documents([12, 30, 2, 47])
    result = sliding_window_nll(docs, lm_scorer(tiny_lm), window=64, stride=63, batch_size=3)
    by_hand = []
    with torch.no_grad():
        for doc in docs:
            logits = tiny_lm(input_ids=doc.input_ids[None]).logits[0]
            nll = torch.nn.functional.cross_entropy(logits[:-1], doc.input_ids[1:], reduction="none")
            by_hand.append(nll)
    all_nll = torch.cat(by_hand)
    assert result.num_tokens == len(all_nll) == 11 + 29 + 1 + 46
    assert result.ppl == pytest.approx(math.exp(all_nll.mean().item()), rel=1e-5)
    for mine, theirs in zip(result.token_nll, by_hand):
        np.testing.assert_allclose(mine, theirs.numpy(), rtol=1e-4, atol=1e-5)


def test_stride_one_matches_a_window_per_token_by_hand(tiny_lm):
    docs = random_documents([20, 9], seed=1)
    window = 6
    result = sliding_window_nll(docs, lm_scorer(tiny_lm), window=window, stride=1, batch_size=4)
    with torch.no_grad():
        for doc, nll in zip(docs, result.token_nll):
            for t in range(1, len(doc.input_ids)):
                context = doc.input_ids[max(0, t - window + 1) : t + 1]
                logits = tiny_lm(input_ids=context[None]).logits[0, -2]
                expected = -torch.log_softmax(logits, -1)[context[-1]].item()
                assert nll[t - 1] == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_stride_one_runs_the_output_layer_only_where_a_token_is_scored(tiny_lm):
    """Full windows at stride 1 score one token each: the scorer is asked for one log-prob per row
    (the LM head at 2 positions, not 16), with the same numbers as full logits."""
    docs = random_documents([100, 90], seed=5)
    calls: list[tuple[int, int]] = []
    trimmed = sliding_window_nll(docs, lm_scorer(tiny_lm, calls), window=16, stride=1, batch_size=8)

    def full_logits(ids, mask, cond, keep):
        return next_token_logprobs(tiny_lm(input_ids=ids, attention_mask=mask).logits, ids)[:, -keep:]

    full = sliding_window_nll(docs, full_logits, window=16, stride=1, batch_size=8)
    for mine, theirs in zip(trimmed.token_nll, full.token_nll):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
    assert (16, 1) in calls and sum(keep for _, keep in calls) < 0.2 * sum(width for width, _ in calls)


def test_strides_agree_on_documents_shorter_than_the_window(tiny_lm):
    docs = random_documents([10, 16, 3], seed=2)
    fast = sliding_window_nll(docs, lm_scorer(tiny_lm), window=16, stride=15)
    exact = sliding_window_nll(docs, lm_scorer(tiny_lm), window=16, stride=1)
    np.testing.assert_allclose(fast.doc_nll, exact.doc_nll, rtol=1e-5)
    # on a longer document they differ: stride 1 gives more context to later tokens
    long_doc = random_documents([40], seed=3)
    fast = sliding_window_nll(long_doc, lm_scorer(tiny_lm), window=16, stride=15)
    exact = sliding_window_nll(long_doc, lm_scorer(tiny_lm), window=16, stride=1)
    assert fast.num_tokens == exact.num_tokens == 39
    assert not np.allclose(fast.token_nll[0], exact.token_nll[0])


def test_condition_ids_reach_the_scorer_aligned_with_their_tokens():
    """A context-free scorer whose NLL depends on (token, condition) pairs: any stride agrees."""

    def scorer(ids, mask, cond, keep):
        assert ((cond == -1) == (mask == 0)).all()
        return -0.01 * (ids[:, 1:] + 2 * cond[:, :-1]).float()[:, -keep:]

    docs = random_documents([23, 7, 40], seed=4)
    expected = [0.01 * (d.input_ids[1:] + 2 * d.condition_ids[:-1]).numpy() for d in docs]
    for stride in (1, 4, 9):
        result = sliding_window_nll(docs, scorer, window=10, stride=stride, batch_size=5)
        for mine, theirs in zip(result.token_nll, expected):
            np.testing.assert_allclose(mine, theirs, rtol=1e-6)


def test_position_in_sentence_and_nll_by_position():
    cond = torch.tensor([0, 0, 1, 1, 1, 2, 2])  # targets 1..6 lie in sentences 0,0,1,1,1,2
    assert position_in_sentence(cond).tolist() == [0, 1, 0, 1, 2, 0]
    doc = ScoringDocument(torch.arange(7), cond)

    def scorer(ids, mask, cond, keep):
        return -torch.ones(ids.shape[0], keep)

    result = sliding_window_nll([doc], scorer, window=4, stride=2)
    mean, counts = nll_by_position(result, [doc], max_position=1)
    assert counts.tolist() == [3, 3]
    np.testing.assert_allclose(mean, [1.0, 1.0])


def test_bootstrap_interval_contains_point_estimate_and_shrinks_with_more_documents():
    rng = np.random.default_rng(0)
    tokens = rng.integers(20, 200, size=400)
    nll = tokens * rng.normal(3.0, 0.3, size=400)
    wide = ppl_interval(nll[:20], tokens[:20], resample_indices(20, 500, seed=1))
    narrow = ppl_interval(nll, tokens, resample_indices(400, 500, seed=1))
    for iv in (wide, narrow):
        assert iv.low < iv.value < iv.high
    assert narrow.value == pytest.approx(math.exp(nll.sum() / tokens.sum()))
    assert (narrow.high - narrow.low) < (wide.high - wide.low)


def test_paired_relative_change_detects_a_small_consistent_gain():
    rng = np.random.default_rng(1)
    tokens = rng.integers(20, 200, size=200)
    reference = tokens * rng.normal(3.0, 0.5, size=200)  # documents vary a lot
    better = reference - 0.01 * tokens  # but every document gains the same little bit
    iv = relative_change_interval(better, reference, tokens, resample_indices(200, 500, seed=2))
    assert iv.value == pytest.approx(math.exp(-0.01) - 1)
    assert iv.high < 0  # significant although the unpaired intervals overlap
    a = ppl_interval(better, tokens, resample_indices(200, 500, seed=2))
    b = ppl_interval(reference, tokens, resample_indices(200, 500, seed=2))
    assert a.high > b.low


def test_edit_distance_and_plan_following():
    assert edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert edit_distance([1, 2, 3], [1, 3]) == 1
    assert edit_distance([], [4, 5]) == 2
    assert edit_distance([1, 2, 3, 4], [2, 1, 3, 5]) == 3
    assert normalized_edit_distance([1, 2], [3, 4]) == 1.0
    assert plan_following_rate([1, 2, 3, 4], [1, 0, 3, 0]) == 0.5
    assert math.isnan(plan_following_rate([], []))
    with pytest.raises(ValueError):
        plan_following_rate([1], [1, 2])


def test_rouge2():
    assert rouge2_f("the moon is bright tonight", "the moon is bright tonight") == 1.0
    assert rouge2_f("cats sleep", "the moon is bright") == 0.0
    assert 0 < rouge2_f("the moon is dark", "the moon is bright") < 1


# ---- the evaluation's scoring path against straightforward per-window computations

@pytest.mark.parametrize("family", sorted(LINEAR_HEAD_FAMILIES))
def test_output_layer_run_by_scoring_gives_the_models_own_logprobs(family):
    """Scoring runs a family's backbone and output layer itself: the log-probs of every non-padding
    target equal those of the model's own `.logits` (fp32; same kernels, so bit for bit here)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size=96)).eval()
    ids = torch.randint(1, 96, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    with torch.no_grad():
        expected = next_token_logprobs(model(input_ids=ids, attention_mask=mask).logits, ids)[:, -5:]
        mine = causal_lm_logprobs(model, ids, mask, 5)
    real = mask[:, -5:].bool()
    torch.testing.assert_close(mine[real], expected[real], rtol=1e-6, atol=1e-6)


def test_output_layer_runs_only_where_a_real_token_is_scored(tiny_lm):
    """Documents of 1 + a multiple of 15 tokens at window 16, stride 15: every window position but
    the first predicts a scored token, so the output layer sees one row per target and none for the
    padding of the short documents batched with full windows."""
    rows: list[int] = []
    hook = tiny_lm.get_output_embeddings().register_forward_hook(lambda m, a, out: rows.append(a[0].shape[0]))
    try:
        docs = random_documents([46, 7, 16, 3], seed=6)
        result = sliding_window_nll(docs, lm_scorer(tiny_lm), window=16, stride=15, batch_size=3)
    finally:
        hook.remove()
    assert sum(rows) == result.num_tokens == 45 + 6 + 15 + 2


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("stride", [1, 5, 15])
def test_evaluation_scorer_matches_one_plain_forward_per_window(family, stride):
    """The batched evaluation scorer (padding, trimmed output layer, conditioning hooks) against one
    unpadded `ActionConditionedLM` forward per window with full logits and a log-softmax, in fp32."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size=61)).eval()
    lm = ActionConditionedLM(base, torch.randn(4, 8, generator=torch.Generator().manual_seed(3))).eval()
    docs = random_documents([40, 9, 23, 2], seed=7)
    num_sentences = int(max(int(d.condition_ids.max()) for d in docs)) + 1
    table = torch.softmax(torch.randn(num_sentences, 4, generator=torch.Generator().manual_seed(4)), -1)
    fast = sliding_window_nll(docs, make_scorer(lm, table, 0, torch.device("cpu"), "32"), window=16,
                              stride=stride, batch_size=4)
    lengths = [len(d.input_ids) for d in docs]
    expected = [np.zeros(n - 1, dtype=np.float32) for n in lengths]
    with torch.no_grad():
        for w in plan_windows(lengths, 16, stride):
            ids = docs[w.doc].input_ids[w.start:w.end][None]
            weights = table[docs[w.doc].condition_ids[w.start:w.end]][None]
            logprobs = torch.log_softmax(lm(input_ids=ids, action_weights=weights).logits[0, :-1], -1)
            positions = torch.arange(w.first_target - w.start, w.end - w.start)
            expected[w.doc][w.first_target - 1:w.end - 1] = -logprobs[positions - 1, ids[0, positions]].numpy()
    for mine, theirs in zip(fast.token_nll, expected):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-5)
