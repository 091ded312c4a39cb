"""The residual conditioning: a shared shift plus a zero-initialised, centred plan residual."""
from __future__ import annotations

import pytest
import torch

from planner_lm.errors import UserError
from planner_lm.models.conditioning import ActionConditionedLM
from test_conditioning import FAMILIES, K, codebook, inputs, tiny_base

RANKS = [0, 3]


def residual_lm(family: str = "gpt2", rank: int = 0, **kwargs) -> ActionConditionedLM:
    return ActionConditionedLM(tiny_base(family), codebook(), conditioning="residual", residual_rank=rank, **kwargs)


def one_hot(actions: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(actions, K).float()


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("family", FAMILIES)
def test_at_step_zero_every_code_source_gives_the_base_model(family, rank):
    lm = residual_lm(family, rank)
    ids, weights = inputs()
    with torch.no_grad():
        plain = lm(ids).logits
        for code in (weights, one_hot(torch.zeros_like(ids)), one_hot(torch.randint(0, K, ids.shape))):
            assert torch.equal(lm(ids, action_weights=code).logits, plain)
    paper = ActionConditionedLM(tiny_base(family), codebook())  # the reference design moves from step 0
    with torch.no_grad():
        assert not torch.allclose(paper(ids, action_weights=weights).logits, plain)


@pytest.mark.parametrize("rank", RANKS)
def test_the_shared_shift_and_the_residual_both_learn_from_the_first_step(rank):
    lm = residual_lm(rank=rank)
    ids, weights = inputs()
    lm(ids, action_weights=weights).logits.logsumexp(-1).mean().backward()
    for adapter in lm.adapters:
        assert adapter.bias.grad.abs().sum() > 0  # every token trains the shared shift
        assert adapter.weight.grad.abs().sum() > 0  # the plan's residual starts to move
    assert lm.codebook.grad.abs().sum() == 0  # nothing flows through a zero residual yet
    if rank:
        assert lm.code_projection.weight.grad.abs().sum() == 0


def test_the_residual_reads_centred_actions_so_the_mean_action_adds_only_the_shared_shift():
    lm = residual_lm()
    with torch.no_grad():
        for adapter in lm.adapters:
            adapter.weight.normal_()
            adapter.bias.normal_()
    uniform = torch.full((1, 1, K), 1.0 / K)
    for slot, adapter in enumerate(lm.adapters):
        assert torch.allclose(lm.action_shift(slot, uniform), adapter.bias, atol=1e-5)
        assert not torch.allclose(lm.action_shift(slot, one_hot(torch.tensor([[1]]))), adapter.bias, atol=1e-3)


def test_low_rank_residual_shares_one_projection_across_layers():
    lm = residual_lm(rank=3)
    assert lm.code_projection.weight.shape == (3, codebook().shape[1])
    assert all(adapter.in_features == 3 for adapter in lm.adapters)
    assert any(p is lm.code_projection.weight for p in lm.adapter_parameters())
    assert {id(p) for p in lm.shared_shift_parameters()} == {id(a.bias) for a in lm.adapters}


@pytest.mark.parametrize("rank", RANKS)
def test_residual_round_trip_keeps_centre_projection_and_adapters(tmp_path, rank):
    lm = residual_lm(rank=rank)
    with torch.no_grad():
        for p in lm.adapters.parameters():
            p.normal_()
        lm.codebook.add_(1.0)  # the saved centre is the one of the initial codebook, not the trained one
    ids, weights = inputs()
    with torch.no_grad():
        expected = lm(ids, action_weights=weights).logits
    lm.save_pretrained(tmp_path / "lm")
    loaded = ActionConditionedLM.from_pretrained(tmp_path / "lm", base=tiny_base("gpt2"))
    assert loaded.settings.conditioning == "residual" and loaded.settings.residual_rank == rank
    with torch.no_grad():
        assert torch.allclose(loaded(ids, action_weights=weights).logits, expected, atol=1e-6)


def test_a_warm_start_across_designs_is_refused(tmp_path):
    paper = ActionConditionedLM(tiny_base("gpt2"), codebook())
    paper.save_pretrained(tmp_path / "paper")
    with pytest.raises(UserError, match="conditioning paper vs residual"):
        residual_lm().warm_start(tmp_path / "paper")


def test_bad_residual_settings_are_user_errors():
    with pytest.raises(UserError, match="conditioning must be one of"):
        ActionConditionedLM(tiny_base("gpt2"), codebook(), conditioning="gated")
    with pytest.raises(UserError, match="residual_rank"):
        ActionConditionedLM(tiny_base("gpt2"), codebook(), residual_rank=4)
