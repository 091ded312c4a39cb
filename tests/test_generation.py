"""Planner-in-the-loop generation: forced plans, the training shift, KV cache, stopping."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from planner_lm.generation import PlannerGenerator, SamplingConfig, sample_next_token
from planner_lm.sentences import is_sentence_complete
from planner_lm.generation_plan import ActionExamples, format_plan
from planner_lm.models.planner import Planner

K, DIM = 5, 8


@pytest.fixture(scope="module")
def tokenizer():
    from planner_lm.tokenization import load_tokenizer

    return load_tokenizer("gpt2")


def hash_encoder(texts):
    """A deterministic stand-in sentence encoder: unit-norm vectors from a text hash."""
    rows = []
    for text in texts:
        seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
        rows.append(torch.randn(DIM, generator=torch.Generator().manual_seed(seed)))
    vectors = torch.stack(rows) if rows else torch.zeros(0, DIM)
    return torch.nn.functional.normalize(vectors, dim=-1)


class ScriptedLM(torch.nn.Module):
    """Writes "cat sat. The cat sat. ..." whatever it is fed; records every call's inputs."""

    def __init__(self, tokenizer):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        ids = {w: tokenizer.encode(w)[0] for w in (" The", " cat", " sat", ".")}
        self.next_of = {ids[" cat"]: ids[" sat"], ids[" sat"]: ids["."], ids["."]: ids[" The"], ids[" The"]: ids[" cat"]}
        self.default = ids[" cat"]
        self.vocab = tokenizer.vocab_size
        self.calls = []

    def forward(self, input_ids, attention_mask, position_ids, action_weights, use_cache, past_key_values=None):
        self.calls.append((input_ids.clone(), action_weights.clone()))
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for b in range(input_ids.shape[0]):
            logits[b, -1, self.next_of.get(int(input_ids[b, -1]), self.default)] = 10.0
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)


def tiny_planner():
    torch.manual_seed(0)
    return Planner(embedding_dim=DIM, num_actions=K, context_sentences=3, ffn_dim=16).eval()


def test_forced_plan_conditions_each_sentence_on_its_action(tokenizer):
    lm = ScriptedLM(tokenizer)
    generator = PlannerGenerator(lm, tokenizer, hash_encoder, K, planner=tiny_planner())
    config = SamplingConfig(max_new_tokens=10, temperature=0)
    (result,) = generator.generate(["The Moon is"], plans=[[3, 1, None]], config=config)
    assert result.continuation == " cat sat. The cat sat. The cat sat"
    texts = [s.text for s in result.sentences]
    assert texts == ["The Moon is cat sat.", "The cat sat.", "The cat sat"]
    assert [s.source for s in result.sentences] == ["forced", "forced", "planner"]
    actions = [s.action for s in result.sentences]
    assert actions[:2] == [3, 1]
    # Every fed token carries the action of the sentence of the token after it (training shift).
    ids, weights = lm.calls[0][0][0].tolist(), list(lm.calls[0][1][0])
    for ids_step, weights_step in lm.calls[1:]:
        ids.append(int(ids_step[0, 0]))
        weights.append(weights_step[0, 0])
    period = tokenizer.encode(".")[0]
    sentence = 0
    for t, (token, w) in enumerate(zip(ids, weights)):
        next_sentence = sentence + 1 if token == period else sentence
        if next_sentence < 2:
            expected = torch.nn.functional.one_hot(torch.tensor(actions[next_sentence]), K).float()
            assert torch.equal(w, expected), f"token {t} ({tokenizer.decode([token])!r})"
        else:  # planner's soft choice for the third sentence
            assert torch.allclose(w.sum(), torch.tensor(1.0)) and int(w.argmax()) == actions[2]
        sentence = next_sentence


def test_without_planner_a_plan_is_required_and_steers(tokenizer):
    lm = ScriptedLM(tokenizer)
    generator = PlannerGenerator(lm, tokenizer, hash_encoder, K, planner=None)
    config = SamplingConfig(max_new_tokens=4, temperature=0)
    (result,) = generator.generate(["The Moon is"], plans=[[2, 4]], config=config)
    assert [s.action for s in result.sentences] == [2, 4]
    assert np.isnan(result.sentences[0].probability)
    with pytest.raises(ValueError, match="no planner"):
        generator.generate(["The Moon is"], plans=[[2]], config=config)
    with pytest.raises(ValueError, match="outside"):
        generator.generate(["The Moon is"], plans=[[K]], config=config)


def test_prompt_sentences_are_planned_and_a_complete_prompt_opens_a_new_sentence(tokenizer):
    lm = ScriptedLM(tokenizer)
    generator = PlannerGenerator(lm, tokenizer, hash_encoder, K, planner=tiny_planner())
    config = SamplingConfig(max_new_tokens=3, temperature=0)
    prompts = ["The Moon is bright. It shines.", "", "Stars"]
    results = generator.generate(prompts, plans=[[4], [], []], config=config)
    first = results[0]
    assert [s.in_prompt for s in first.sentences] == [True, True, False]
    assert [s.text for s in first.sentences] == ["The Moon is bright.", "It shines.", "The cat sat"]
    assert first.sentences[2].action == 4
    # the prompt's final "." was fed with the forced action of the sentence it opens
    prompt_ids, prompt_weights = lm.calls[0][0][0], lm.calls[0][1][0]
    assert int(prompt_ids[-1]) == tokenizer.encode(".")[0]
    assert int(prompt_weights[-1].argmax()) == 4 and float(prompt_weights[-1].max()) == 1.0
    assert results[1].continuation == " cat sat." and results[2].text == "Stars cat sat."


def test_generation_stops_cleanly_at_max_tokens_with_a_real_lm_and_kv_cache(tokenizer):
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=16, n_embd=16, n_layer=2, n_head=2)).eval()

    class Wrapped(torch.nn.Module):  # the conditioned-LM signature around a plain GPT-2
        def __init__(self):
            super().__init__()
            self.base, self.config = base, base.config

        def forward(self, action_weights=None, **kwargs):
            return self.base(**kwargs)

    generator = PlannerGenerator(Wrapped(), tokenizer, hash_encoder, K, planner=tiny_planner())
    config = SamplingConfig(max_new_tokens=8, temperature=0, stop_at_eos=False)
    results = generator.generate(["The Moon is", "A"], config=config)
    for result in results:
        assert result.new_tokens == 8 and not result.stopped_at_eos
        assert result.text.startswith(result.prompt)
        # greedy with a KV cache (left-padded batch) = greedy by full recomputation
        ids = [tokenizer.eos_token_id] + tokenizer.encode(result.prompt)
        expected = []
        for _ in range(8):
            with torch.no_grad():
                nxt = int(base(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            expected.append(nxt)
        assert result.continuation == tokenizer.decode(expected)
    # past the context window (16 positions) the cache is rebuilt and generation goes on
    long = SamplingConfig(max_new_tokens=30, temperature=1.0, top_p=0.9, stop_at_eos=False, seed=3)
    (result,) = generator.generate(["The Moon is"], config=long)
    assert result.new_tokens == 30
    assert "plan:" in format_plan(result)


def test_sampling_helpers():
    logits = torch.tensor([[0.0, 5.0, 4.0, -10.0]])
    assert sample_next_token(logits, 0.0, 1.0, None).tolist() == [1]
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample_next_token(logits, 1.0, 0.5, gen)) for _ in range(50)}
    assert draws == {1}  # top-p 0.5 keeps only the most likely token
    draws = {int(sample_next_token(logits, 1.0, 0.99, gen)) for _ in range(200)}
    assert draws == {1, 2}
    assert is_sentence_complete("The Moon is bright.")
    assert not is_sentence_complete("The Moon is")
    assert not is_sentence_complete("It was found by Dr.")
    assert is_sentence_complete("Heading\n\n")


def test_action_examples_are_the_nearest_members_of_the_cluster():
    centroids = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    embeddings = np.array([[0.9, 0.1], [0.1, 0.9], [0.99, 0.0], [0.5, 0.5], [0.0, 1.0]], dtype=np.float16)
    actions = np.array([0, 1, 0, 0, 1])
    examples = ActionExamples(["a", "b", "c", "d", "e"], embeddings, actions, centroids, per_action=2)
    assert examples(0) == ["c", "a"]
    assert examples(1) == ["e", "b"]


def conditioned_tiny_lm(tokenizer):
    from planner_lm.models.base_lm import tiny_config
    from planner_lm.models.conditioning import ActionConditionedLM

    torch.manual_seed(0)
    config = tiny_config("gpt2", vocab_size=tokenizer.vocab_size, n_positions=64)
    base = GPT2LMHeadModel(config).eval()
    codebook = torch.randn(K, 16) * 3  # large actions so that steering changes greedy choices
    return ActionConditionedLM(base, codebook).eval()


def test_real_conditioned_lm_cached_generation_equals_recomputation_and_plans_steer(tokenizer):
    lm = conditioned_tiny_lm(tokenizer)
    generator = PlannerGenerator(lm, tokenizer, hash_encoder, K, planner=None)
    config = SamplingConfig(max_new_tokens=6, temperature=0, stop_at_eos=False)
    outputs = {}
    for action in (1, 3):
        (result,) = generator.generate(["The Moon is"], plans=[[action] * 20], config=config)
        outputs[action] = result.continuation
        ids = [tokenizer.eos_token_id] + tokenizer.encode("The Moon is")
        weights = torch.nn.functional.one_hot(torch.tensor([[action]]), K).float()
        for _ in range(6):
            with torch.no_grad():
                logits = lm(input_ids=torch.tensor([ids]), action_weights=weights).logits
            ids.append(int(logits[0, -1].argmax()))
        assert result.continuation == tokenizer.decode(ids[-6:])
    assert outputs[1] != outputs[3]
    # the unconditioned control equals the plain base model
    (plain,) = generator.generate(["The Moon is"], config=SamplingConfig(max_new_tokens=6, temperature=0, stop_at_eos=False, selection="none"))
    ids = [tokenizer.eos_token_id] + tokenizer.encode("The Moon is")
    for _ in range(6):
        with torch.no_grad():
            ids.append(int(lm.base(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert plain.continuation == tokenizer.decode(ids[-6:])
    with pytest.raises(ValueError, match="unconditioned"):
        generator.generate(["x"], plans=[[1]], config=SamplingConfig(selection="none"))
