"""Plain-torch planner and context gathering: shapes, document boundaries, learning, persistence."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from planner_lm.data.contexts import gather_contexts
from planner_lm.models.planner import PLANNER_DIR, Planner


pytestmark = pytest.mark.usefixtures("one_thread")


def _docs(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Global sentence ids and their document's first sentence for documents of `lengths`."""
    ids, firsts, start = [], [], 0
    for n in lengths:
        ids += range(start, start + n)
        firsts += [start] * n
        start += n
    return torch.tensor(ids), torch.tensor(firsts)


# --------------------------------------------------------------------------- gather_contexts
@pytest.mark.parametrize("as_numpy", [False, True])
def test_gather_contexts_stays_inside_the_document(as_numpy: bool) -> None:
    ids, firsts = _docs([1, 4, 2])  # sentences 0 | 1 2 3 4 | 5 6
    emb = torch.arange(7, dtype=torch.float32)[:, None].repeat(1, 3) + 1  # row j holds j+1
    source = emb.numpy().astype(np.float16) if as_numpy else emb
    context, mask = gather_contexts(source, ids, firsts, context_sentences=2)

    assert context.shape == (7, 2, 3) and context.dtype == torch.float32
    expected_mask = [[0, 0], [0, 0], [0, 1], [1, 1], [1, 1], [0, 0], [0, 1]]
    assert mask.tolist() == [[bool(v) for v in row] for row in expected_mask]
    # value j+1 = sentence j; 0 = masked slot
    expected = [[0, 0], [0, 0], [0, 2], [2, 3], [3, 4], [0, 0], [0, 6]]
    assert context[..., 0].tolist() == expected
    assert torch.equal(context[..., 0], context[..., 2])


def test_gather_contexts_memmap_matches_tensor(tmp_path) -> None:
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((50, 8)).astype(np.float16)
    np.save(tmp_path / "e.npy", emb)
    mm = np.load(tmp_path / "e.npy", mmap_mode="r")
    ids, firsts = _docs([7, 20, 3, 20])
    pick = torch.randperm(50, generator=torch.Generator().manual_seed(0))[:30]
    a, ma = gather_contexts(mm, ids[pick], firsts[pick], 5)
    b, mb = gather_contexts(torch.from_numpy(emb), ids[pick], firsts[pick], 5)
    assert torch.equal(ma, mb) and torch.equal(a, b)
    # slot s of target j is sentence j - 5 + s; target 10 (document 7..26) sees sentences 7, 8, 9
    j = 10
    (row,) = (ids[pick] == j).nonzero()[:, 0].tolist()
    assert ma[row].tolist() == [False, False, True, True, True]
    for s in (2, 3, 4):
        assert torch.equal(a[row, s], torch.from_numpy(emb[j - 5 + s].astype(np.float32)))


def test_gather_contexts_rejects_inconsistent_ids() -> None:
    with pytest.raises(ValueError):
        gather_contexts(torch.zeros(5, 2), torch.tensor([1]), torch.tensor([2]), 3)
    with pytest.raises(IndexError):
        gather_contexts(np.zeros((5, 2)), torch.tensor([9]), torch.tensor([9]), 3)


# --------------------------------------------------------------------------- planner
def test_forward_shapes_and_empty_context() -> None:
    planner = Planner(embedding_dim=8, num_actions=5, context_sentences=3, num_heads=2, ffn_dim=16)
    ctx = torch.randn(4, 3, 8)
    mask = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    logits = planner(ctx, mask)
    assert logits.shape == (4, 5) and torch.isfinite(logits).all()
    # masked slots are ignored entirely
    planner.eval()
    noisy = ctx.clone()
    noisy[~mask] = 1000.0
    assert torch.allclose(planner(ctx, mask), planner(noisy, mask), atol=1e-5)


def test_head_initialised_from_centroids_equals_codebook() -> None:
    centroids = torch.randn(6, 8)
    for model_dim in (None, 16):
        planner = Planner(8, 6, context_sentences=2, model_dim=model_dim, ffn_dim=16)
        planner.init_head_from_centroids(centroids)
        assert torch.equal(planner.head.weight, centroids)
        assert torch.count_nonzero(planner.head.bias) == 0
    with pytest.raises(ValueError):
        planner.init_head_from_centroids(torch.randn(7, 8))


def test_positions_are_small_next_to_unit_norm_content() -> None:
    planner = Planner(64, 4, context_sentences=6, ffn_dim=32)
    content = planner.input_proj(F.normalize(torch.randn(100, 64), dim=-1)).norm(dim=-1).mean()
    positions = planner.positions.weight.norm(dim=-1).mean()
    assert positions < 0.3 * content


def _planted_batch(batch: int, k: int, dim: int, S: int, gen: torch.Generator, codebook: torch.Tensor):
    """Sequences where action[t+1] = (3 * action[t] + 1) % k; sentence = noisy centroid."""
    lengths = torch.randint(1, S + 1, (batch,), generator=gen)
    actions = torch.randint(0, k, (batch, 1), generator=gen)
    seq = [actions]
    for _ in range(S):
        seq.append((3 * seq[-1] + 1) % k)
    seq = torch.cat(seq, 1)  # [B, S+1]
    vectors = F.normalize(codebook[seq] + 0.3 * torch.randn(batch, S + 1, dim, generator=gen), dim=-1)
    # right-aligned: the last `length` sentences before the target are real
    slots = torch.arange(S)[None]
    mask = slots >= (S - lengths)[:, None]
    # target follows sentence index `length - 1` of the sequence; place sentences 0..length-1
    idx = (slots - (S - lengths)[:, None]).clamp(min=0)
    context = vectors.gather(1, idx[..., None].expand(-1, -1, dim)) * mask[..., None]
    target = seq.gather(1, lengths[:, None]).squeeze(1)
    return context, mask, target


def test_planner_learns_a_planted_rule() -> None:
    torch.manual_seed(0)
    k, dim, S = 16, 32, 4
    gen = torch.Generator().manual_seed(1)
    codebook = F.normalize(torch.randn(k, dim, generator=gen), dim=-1)
    planner = Planner(dim, k, context_sentences=S, num_heads=2, ffn_dim=64, dropout=0.0)
    planner.init_head_from_centroids(codebook)
    opt = torch.optim.Adam(planner.parameters(), lr=3e-3)
    for _ in range(80):
        ctx, mask, target = _planted_batch(64, k, dim, S, gen, codebook)
        loss = F.cross_entropy(planner(ctx, mask), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    planner.eval()
    ctx, mask, target = _planted_batch(512, k, dim, S, gen, codebook)
    with torch.no_grad():
        acc = (planner(ctx, mask).argmax(-1) == target).float().mean().item()
    assert acc > 0.5, f"accuracy {acc:.2f} (chance {1 / k:.2f})"


def test_save_and_from_pretrained_round_trip(tmp_path) -> None:
    planner = Planner(8, 5, context_sentences=3, num_layers=2, ffn_dim=16, dropout=0.0).eval()
    path = planner.save_pretrained(tmp_path / PLANNER_DIR, upstream={"cluster": "abc"})
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "config.json", "model.safetensors"]  # no pickle
    for where in (tmp_path, path):  # the stage directory or the planner folder
        loaded = Planner.from_pretrained(where).eval()
        assert loaded.config == planner.config and loaded.upstream == {"cluster": "abc"}
        ctx, mask = torch.randn(2, 3, 8), torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool)
        assert torch.equal(loaded(ctx, mask), planner(ctx, mask))


def test_last_pooling_reads_the_previous_sentence_and_mean_pooling_all():
    torch.manual_seed(0)
    context, mask = torch.randn(1, 3, 8), torch.ones(1, 3, dtype=torch.bool)
    older_changed = context.clone()
    older_changed[0, 0] = torch.randn(8)
    for pooling, older_matters in (("last", False), ("mean", True)):
        planner = Planner(8, 5, context_sentences=3, num_layers=0, ffn_dim=16, pooling=pooling).eval()
        changed = not torch.allclose(planner(context, mask), planner(older_changed, mask))
        assert changed == older_matters, pooling
