"""Selection modes: the weights each one gives and whether gradient reaches the planner."""

import pytest
import torch

from planner_lm.models.selection import (
    GRADIENT_SELECTIONS,
    SELECTIONS,
    action_embeddings,
    select_weights,
)

K = 6


@pytest.fixture
def logits() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(2, 5, K, requires_grad=True)


def test_soft_is_tempered_softmax(logits):
    weights = select_weights(logits, "soft", temperature=2.0)
    torch.testing.assert_close(weights, torch.softmax(logits / 2.0, dim=-1))


@pytest.mark.parametrize("mode", ["hard", "straight_through"])
def test_hard_modes_pick_the_argmax(logits, mode):
    weights = select_weights(logits, mode, training=True)
    expected = torch.nn.functional.one_hot(logits.argmax(-1), K).float()
    torch.testing.assert_close(weights, expected)


@pytest.mark.parametrize("mode", SELECTIONS[:-1])
def test_weights_are_distributions(logits, mode):
    oracle = torch.randint(0, K, (2, 5))
    positions = torch.arange(10).reshape(2, 5)
    weights = select_weights(logits, mode, training=True, oracle_actions=oracle, sentence_index=positions)
    assert weights.shape == (2, 5, K)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 5))
    assert (weights >= 0).all()


@pytest.mark.parametrize("mode", ["soft", "pred", "straight_through", "gumbel", "hard"])
def test_gradient_reaches_logits_only_in_differentiable_modes(logits, mode):
    weights = select_weights(logits, mode, training=True)
    target = torch.randn(K)
    if not weights.requires_grad:
        assert mode not in GRADIENT_SELECTIONS
        return
    (weights * target).sum().backward()
    assert mode in GRADIENT_SELECTIONS
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_hard_gives_no_gradient(logits):
    assert not select_weights(logits, "hard", training=True).requires_grad


def test_straight_through_gradient_is_the_softmax_gradient(logits):
    target = torch.randn(K)
    (select_weights(logits, "straight_through") * target).sum().backward()
    st_grad = logits.grad.clone()
    logits.grad = None
    (select_weights(logits, "soft") * target).sum().backward()
    torch.testing.assert_close(st_grad, logits.grad)


def test_gumbel_is_noisy_in_training_and_softmax_in_eval(logits):
    torch.manual_seed(1)
    train_a = select_weights(logits, "gumbel", training=True)
    train_b = select_weights(logits, "gumbel", training=True)
    assert not torch.allclose(train_a, train_b)
    torch.testing.assert_close(select_weights(logits, "gumbel", training=False),
                               torch.softmax(logits, -1))


def test_gumbel_scale_zero_is_softmax(logits):
    torch.testing.assert_close(select_weights(logits, "gumbel", training=True, gumbel_scale=0.0),
                               torch.softmax(logits, -1))


def test_oracle_is_one_hot_and_padding_is_zero():
    actions = torch.tensor([[2, 0, -1]])
    weights = select_weights(None, "oracle", oracle_actions=actions, num_actions=4)
    expected = torch.tensor([[[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]], dtype=torch.float32)
    torch.testing.assert_close(weights, expected)


def test_fixed_and_uniform_without_planner():
    fixed = select_weights(None, "fixed", num_actions=4, batch_shape=(2, 3))
    assert fixed.shape == (2, 3, 4) and (fixed[..., 0] == 1).all() and fixed[..., 1:].sum() == 0
    uniform = select_weights(None, "uniform", num_actions=4, batch_shape=(2, 3))
    torch.testing.assert_close(uniform, torch.full((2, 3, 4), 0.25))


def test_uniform_embedding_is_codebook_mean():
    codebook = torch.randn(4, 3)
    weights = select_weights(None, "uniform", num_actions=4, batch_shape=(1,))
    torch.testing.assert_close(action_embeddings(weights, codebook)[0], codebook.mean(0))


def test_none_returns_none(logits):
    assert select_weights(logits, "none") is None


def test_bad_inputs_raise(logits):
    with pytest.raises(ValueError, match="unknown selection"):
        select_weights(logits, "softmax")
    with pytest.raises(ValueError, match="needs planner logits"):
        select_weights(None, "soft")
    with pytest.raises(ValueError, match="oracle_actions"):
        select_weights(logits, "oracle")
    with pytest.raises(ValueError, match="temperature"):
        select_weights(logits, "soft", temperature=0.0)


def test_boundary_alternates_two_actions_by_sentence_and_ignores_content(logits):
    positions = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 1, 1, 2]])
    weights = select_weights(logits, "boundary", sentence_index=positions)
    assert weights.argmax(-1).tolist() == [[0, 1, 0, 1, 0], [0, 0, 1, 1, 0]]
    other = select_weights(torch.randn_like(logits), "boundary", sentence_index=positions)
    torch.testing.assert_close(weights, other)  # planner logits do not matter
    assert not weights.requires_grad
    with pytest.raises(ValueError, match="sentence_index"):
        select_weights(logits, "boundary")


def test_position_codes_the_capped_sentence_index_and_ignores_content():
    """Action min(index, 15) (and at most K - 1): the first 15 sentences apart, every later one alike."""
    positions = torch.tensor([[0, 1, 2, 14, 15, 16, 40]])
    wide = torch.randn(1, 7, 20)
    weights = select_weights(wide, "position", sentence_index=positions)
    assert weights.argmax(-1).tolist() == [[0, 1, 2, 14, 15, 15, 15]]
    torch.testing.assert_close(weights, select_weights(torch.randn_like(wide), "position", sentence_index=positions))
    assert select_weights(None, "position", sentence_index=positions, num_actions=4).argmax(-1).tolist() == [
        [0, 1, 2, 3, 3, 3, 3]]  # K = 4: capped at K - 1
    assert not weights.requires_grad
    with pytest.raises(ValueError, match="sentence_index"):
        select_weights(wide, "position")
