"""Action-conditioned LM on tiny GPT-2 and Llama configs built in-process."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from planner_lm.errors import UserError
from planner_lm.models.base_lm import load_base_lm, tiny_config
from planner_lm.models.adapters import ADAPTER_TARGETS
from planner_lm.models.conditioning import ActionConditionedLM

K, D, VOCAB = 5, 8, 96
FAMILIES = ["gpt2", "llama"]


def tiny_base(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, vocab_size=VOCAB)).eval()


def codebook(seed: int = 1) -> torch.Tensor:
    return torch.randn(K, D, generator=torch.Generator().manual_seed(seed))


def inputs(batch: int = 2, length: int = 12):
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
    weights = torch.softmax(torch.randn(batch, length, K, generator=generator), -1)
    return ids, weights


@pytest.mark.parametrize("family", FAMILIES)
def test_no_actions_is_bit_identical_to_base(family):
    base = tiny_base(family)
    ids, _ = inputs()
    with torch.no_grad():
        expected = base(ids).logits.clone()
        lm = ActionConditionedLM(base, codebook())
        assert torch.equal(lm(ids).logits, expected)
        assert torch.equal(lm(ids, action_weights=None).logits, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_actions_change_output_and_different_actions_differ(family):
    lm = ActionConditionedLM(tiny_base(family), codebook())
    ids, weights = inputs()
    with torch.no_grad():
        plain = lm(ids).logits
        first = lm(ids, action_weights=weights).logits
        other = lm(ids, action_weights=weights.flip(-1)).logits
    assert not torch.allclose(plain, first)
    assert not torch.allclose(first, other)


def test_default_layers_skip_first_two_and_adapters_are_xavier_with_zero_bias():
    lm = ActionConditionedLM(tiny_base("gpt2"), codebook())
    assert lm.conditioned_layers == [2, 3]
    assert len(lm.adapters) == 2 and lm.codebook.shape == (2, K, D)
    for adapter in lm.adapters:
        assert adapter.weight.shape == (32, D)
        assert torch.count_nonzero(adapter.bias) == 0 and adapter.weight.std() > 0


def test_unconditioned_layers_are_untouched():
    """Conditioning only layer 3 of 4 leaves the hidden states of layers 0-2 identical."""
    lm = ActionConditionedLM(tiny_base("llama"), codebook(), conditioned_layers=[-1])
    ids, weights = inputs()
    with torch.no_grad():
        plain = lm(ids, output_hidden_states=True).hidden_states
        cond = lm(ids, action_weights=weights, output_hidden_states=True).hidden_states
    for layer in range(4):  # hidden_states[i] is the input of block i
        assert torch.equal(plain[layer], cond[layer])
    assert not torch.allclose(plain[4], cond[4])


def test_shared_codebook_and_frozen_codebook():
    lm = ActionConditionedLM(tiny_base("gpt2"), codebook(), per_layer_codebook=False,
                             train_codebook=False)
    assert lm.codebook.shape == (1, K, D) and not lm.codebook.requires_grad
    lm.set_codebook_trainable(True)
    assert lm.codebook.requires_grad


def test_frozen_mode_trains_only_adapters_and_codebook():
    lm = ActionConditionedLM(tiny_base("gpt2"), codebook())
    ids, weights = inputs()
    weights = weights.clone().requires_grad_(True)  # stands in for planner output
    lm(ids, action_weights=weights, labels=ids).loss.backward()
    assert all(p.grad is None for p in lm.base.parameters())
    assert all(p.grad is not None for p in lm.adapter_parameters())
    assert lm.codebook.grad is not None
    assert weights.grad is not None and weights.grad.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_mode_trains_only_lora_and_adapters(family):
    lm = ActionConditionedLM(tiny_base(family), codebook(), base_mode="lora", lora_r=2)
    trainable = {name for name, p in lm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith(("adapters.", "codebook")) for n in trainable)
    assert any("lora_" in n for n in trainable)
    ids, weights = inputs()
    lm(ids, action_weights=weights, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in lm.named_parameters() if "lora_B" in n)


def test_full_mode_trains_everything():
    lm = ActionConditionedLM(tiny_base("gpt2"), codebook(), base_mode="full")
    assert all(p.requires_grad for p in lm.parameters())


def test_bad_configuration_is_a_user_error():
    unknown = tiny_base("gpt2")
    unknown.config.model_type = "mamba_like"
    with pytest.raises(UserError, match="supported: .*gpt2.*llama"):
        ActionConditionedLM(unknown, codebook())
    with pytest.raises(UserError, match="does not exist"):
        ActionConditionedLM(tiny_base("gpt2"), codebook(), conditioned_layers=[7])
    with pytest.raises(UserError, match="pass conditioned_layers"):
        base = AutoModelForCausalLM.from_config(tiny_config("gpt2", vocab_size=VOCAB, n_layer=2))
        ActionConditionedLM(base, codebook())
    with pytest.raises(UserError, match="base_mode"):
        ActionConditionedLM(tiny_base("gpt2"), codebook(), base_mode="partial")


def test_registry_covers_the_paper_families():
    assert {"gpt2", "llama", "olmo", "mistral"} <= set(ADAPTER_TARGETS)


def test_wrong_weight_shapes_raise():
    lm = ActionConditionedLM(tiny_base("gpt2"), codebook())
    ids, weights = inputs()
    with pytest.raises(ValueError, match="num|positions|batch"):
        lm(ids, action_weights=weights[..., :3])
    with pytest.raises(ValueError, match="positions"):
        lm(ids, action_weights=weights[:, :5])


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_matches_full_forward(family):
    lm = ActionConditionedLM(tiny_base(family), codebook())
    ids, weights = inputs()
    with torch.no_grad():
        full = lm(ids, action_weights=weights).logits
        prefix = lm(ids[:, :-1], action_weights=weights[:, :-1], use_cache=True)
        step = lm(ids[:, -1:], action_weights=weights[:, -1:],
                  past_key_values=prefix.past_key_values, use_cache=True)
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)


def test_generate_with_one_action_per_sequence():
    lm = ActionConditionedLM(tiny_base("gpt2"), codebook())
    ids, _ = inputs(batch=1, length=4)
    plain = lm.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    steered = lm.generate(ids, action_weights=torch.eye(K)[None, :1] * 50, max_new_tokens=6,
                          do_sample=False, pad_token_id=0)
    assert plain.shape == steered.shape == (1, 10)
    assert torch.equal(plain, tiny_base("gpt2").generate(ids, max_new_tokens=6, do_sample=False,
                                                         pad_token_id=0))


@pytest.mark.parametrize(("family", "base_mode"), [("gpt2", "frozen"), ("llama", "frozen"), ("gpt2", "lora")])
def test_save_load_round_trip_gives_identical_logits(tmp_path, family, base_mode):
    """The base is referenced by directory, adapters/codebook/LoRA saved; logits identical."""
    base_dir = tmp_path / "base"
    tiny_base(family).save_pretrained(base_dir)
    lm = ActionConditionedLM(load_base_lm(str(base_dir)), codebook(), base_mode=base_mode,
                             lora_r=2)
    with torch.no_grad():  # make the trained parts non-trivial
        lm.codebook.add_(torch.randn_like(lm.codebook))
        for name, p in lm.base.named_parameters():
            if "lora_B" in name:
                p.normal_()
    lm.save_pretrained(tmp_path / "cond")
    config = json.loads((tmp_path / "cond" / "conditioning_config.json").read_text())
    assert not config["base_saved"] and config["base_fingerprint"]
    assert not (tmp_path / "cond" / "base").exists()

    loaded = ActionConditionedLM.from_pretrained(tmp_path / "cond").eval()
    ids, weights = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, action_weights=weights).logits,
                                   lm.eval()(ids, action_weights=weights).logits, rtol=0, atol=0)


def test_in_process_or_fully_trained_base_is_saved(tmp_path):
    lm = ActionConditionedLM(tiny_base("llama"), codebook(), base_mode="full")
    lm.save_pretrained(tmp_path / "cond")
    assert (tmp_path / "cond" / "base" / "config.json").is_file()
    loaded = ActionConditionedLM.from_pretrained(tmp_path / "cond").eval()
    ids, weights = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(ids, action_weights=weights).logits,
                           lm.eval()(ids, action_weights=weights).logits)


def test_changed_base_is_refused(tmp_path):
    base_dir = tmp_path / "base"
    tiny_base("gpt2").save_pretrained(base_dir)
    ActionConditionedLM(load_base_lm(str(base_dir)), codebook()).save_pretrained(tmp_path / "cond")
    tiny_base("gpt2", seed=5).save_pretrained(base_dir)
    with pytest.raises(UserError, match="fingerprint"):
        ActionConditionedLM.from_pretrained(tmp_path / "cond")


@pytest.mark.parametrize("family", ["gpt2", "olmo"])
def test_ffn_input_site_conditions_the_feed_forward_input_and_survives_a_round_trip(tmp_path, family):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size=VOCAB)).eval()
    lm = ActionConditionedLM(base, codebook(), adapter_site="ffn_input")
    ids, weights = inputs()
    with torch.no_grad():
        plain = lm(ids).logits
        conditioned = lm(ids, action_weights=weights).logits
    assert not torch.allclose(plain, conditioned)
    assert lm.adapters[0].out_features == base.config.hidden_size
    lm.save_pretrained(tmp_path)
    loaded = ActionConditionedLM.from_pretrained(tmp_path, base=base).eval()
    assert loaded.settings.adapter_site == "ffn_input"
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, action_weights=weights).logits, conditioned)
    with pytest.raises(UserError, match="adapter_site"):
        ActionConditionedLM(tiny_base("gpt2"), codebook(), adapter_site="embeddings")


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_activation_checkpointing_gives_the_same_gradients(model_type):
    """Blocks recomputed in backward must read the same action weights as in forward."""
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0) if model_type == "gpt2" else {}
    torch.manual_seed(0)
    base_state = AutoModelForCausalLM.from_config(tiny_config(model_type, **no_dropout)).state_dict()
    codebook, ids = torch.randn(4, 8), torch.randint(0, 96, (2, 10))
    weights = torch.softmax(torch.randn(2, 10, 4), -1)
    grads = []
    for checkpointing in (False, True):
        base = AutoModelForCausalLM.from_config(tiny_config(model_type, **no_dropout))
        base.load_state_dict(base_state)
        lm = ActionConditionedLM(base, codebook, base_mode="full").train()
        if checkpointing:
            lm.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm(input_ids=ids, action_weights=weights, labels=ids).loss.backward()
        grads.append({name: p.grad.clone() for name, p in lm.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("adapters" in name for name in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
