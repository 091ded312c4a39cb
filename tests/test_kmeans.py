"""k-means pieces (plain torch/faiss) and the Lloyd-iteration LightningModule."""
from __future__ import annotations

from collections import Counter

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from planner_lm.data.embeddings import EmbeddingBatches
from planner_lm.lit.kmeans import KMeansModule
import planner_lm.models.kmeans as kmeans_lib
from planner_lm.models.kmeans import (
    FaissAssigner,
    faiss_available,
    hartigan_assign,
    initial_centroids,
    kmeans_plusplus_init,
    lloyd_update,
    resolve_backend,
    torch_assign,
)

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")


def planted(num_points: int = 3000, k: int = 6, dim: int = 12, spread: float = 4.0, seed: int = 0):
    """Points around k well-separated centres (float16, as the embed stage stores them)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim)).astype(np.float32) * spread
    labels = rng.integers(k, size=num_points)
    points = centres[labels] + rng.standard_normal((num_points, dim)).astype(np.float32)
    return points.astype(np.float16), labels


def purity(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Share of points whose cluster's majority label is their own label."""
    hits = sum(Counter(labels[predicted == c].tolist()).most_common(1)[0][1] for c in np.unique(predicted))
    return hits / len(labels)


def unit_noise(num_points: int, dim: int, seed: int) -> np.ndarray:
    """Random unit vectors (float16): no cluster structure, like heavily overlapping embeddings."""
    x = np.random.default_rng(seed).standard_normal((num_points, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def inertia_of(points: np.ndarray, centroids: torch.Tensor) -> float:
    return float(torch_assign(torch.from_numpy(points).float(), centroids.detach().float())[1].double().sum())


def fit(points: np.ndarray, k: int, epochs: int, tmp_path=None, ckpt_path=None, module_class=None,
        **module_kwargs) -> KMeansModule:
    L.seed_everything(3)
    module = (module_class or KMeansModule)(num_clusters=k, embedding_dim=points.shape[1], **module_kwargs)
    callbacks = []
    if tmp_path is not None:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, callbacks=callbacks,
                        enable_checkpointing=bool(callbacks), enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(EmbeddingBatches(points, None, batch_size=500), batch_size=None), ckpt_path=ckpt_path)
    return module


def test_torch_assign_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    x, c = torch.randn(1000, 24, generator=gen), torch.randn(37, 24, generator=gen)
    ids, dist = torch_assign(x, c, rows_per_chunk=128)
    brute = torch.cdist(x.double(), c.double()) ** 2
    assert torch.equal(ids, brute.argmin(dim=1))
    torch.testing.assert_close(dist.double(), brute.min(dim=1).values, rtol=1e-4, atol=1e-4)


@needs_faiss
def test_faiss_assign_agrees_with_torch():
    gen = torch.Generator().manual_seed(1)
    x, c = torch.randn(2000, 16, generator=gen), torch.randn(50, 16, generator=gen)
    ids_t, dist_t = torch_assign(x, c)
    assigner = FaissAssigner()
    ids_f, dist_f = assigner(x, c)
    assert (ids_t == ids_f).float().mean() > 0.999  # float rounding may flip exact near-ties
    torch.testing.assert_close(dist_f, dist_t, rtol=1e-4, atol=1e-4)
    c.mul_(2.0)  # in-place change of the centroids must rebuild the index
    ids_t2, _ = torch_assign(x, c)
    assert (assigner(x, c)[0] == ids_t2).float().mean() > 0.999


def test_backend_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("torch", cuda) == "torch"
    assert resolve_backend("auto", cpu) == ("faiss" if faiss_available() else "torch")
    with pytest.raises(ValueError, match="torch"):
        resolve_backend("nope", cpu)  # type: ignore[arg-type]
    try:
        import faiss
        has_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except ImportError:
        has_gpu = False
    if not has_gpu:
        assert resolve_backend("auto", cuda) == "torch"
        with pytest.raises(ValueError, match="faiss-gpu"):
            resolve_backend("faiss", cuda)


def test_kmeans_plusplus_seeds_one_centre_per_planted_cluster():
    points, labels = planted(num_points=2000, k=6, spread=8.0)
    x = torch.from_numpy(points).float()
    centres = kmeans_plusplus_init(x, 6, torch.Generator().manual_seed(0))
    ids, _ = torch_assign(x, centres)
    assert purity(ids.numpy(), labels) == 1.0
    assert len(set(ids.tolist())) == 6
    # reproducible from the seed, and random init gives distinct sample rows
    torch.testing.assert_close(initial_centroids(x, 6, "kmeans++", seed=5), initial_centroids(x, 6, "kmeans++", seed=5))
    assert torch.unique(initial_centroids(x, 6, "random", seed=5), dim=0).shape[0] == 6


def test_kmeans_plusplus_from_pairwise_distances_equals_the_per_step_matmul(monkeypatch):
    points, _ = planted(num_points=1200, k=10, spread=3.0)
    x = torch.from_numpy(points).float()
    pairwise = kmeans_plusplus_init(x, 10, torch.Generator().manual_seed(4))
    monkeypatch.setattr(kmeans_lib, "PAIRWISE_MAX_ROWS", 0)
    per_step = kmeans_plusplus_init(x, 10, torch.Generator().manual_seed(4))
    torch.testing.assert_close(pairwise, per_step)


def test_hartigan_assign_follows_the_size_weighted_rule():
    """Brute force in float64: x in its nearest cluster a (n_a members) moves to b when
    n_b/(n_b+1)·||x-c_b||² < n_a/(n_a-1)·||x-c_a||²; a cluster of one member keeps its point."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3000, 8, generator=gen, dtype=torch.float64)
    centroids = torch.randn(40, 8, generator=gen, dtype=torch.float64)
    sizes = torch.randint(2, 40, (40,), generator=gen).double()
    sizes[:5] = 1.0
    chosen, nearest = hartigan_assign(x, centroids, sizes, rows_per_chunk=512)
    d = torch.cdist(x, centroids) ** 2
    own = d.argmin(dim=1)
    stay = d.min(dim=1).values * torch.where(sizes > 1, sizes / (sizes - 1), 0.0)[own]
    move = (d * sizes / (sizes + 1)).scatter(1, own.unsqueeze(1), torch.inf)
    expected = torch.where(stay <= move.min(dim=1).values, own, move.argmin(dim=1))
    assert torch.equal(chosen, expected)
    torch.testing.assert_close(nearest, d.min(dim=1).values)
    assert 0.05 < (chosen != own).double().mean() < 0.95  # the rule matters here, and is not Lloyd's
    assert torch.equal(chosen[own < 5], own[own < 5])  # singletons stay


def test_update_moves_to_means_and_splits_the_largest_cluster_into_empty_ones():
    previous = torch.zeros(3, 4)
    sums = torch.tensor([[3.0, 3, 3, 3], [0, 0, 0, 0], [10, 5, 0, -5]], dtype=torch.float64)
    counts = torch.tensor([3.0, 0.0, 5.0], dtype=torch.float64)
    centroids, reseeded, sizes = lloyd_update(sums, counts, previous)
    assert reseeded == 1
    torch.testing.assert_close(centroids[0], torch.ones(4))
    mean_largest = torch.tensor([2.0, 1.0, 0.0, -1.0])
    # the empty cluster and the largest one straddle the largest one's mean
    torch.testing.assert_close((centroids[1] + centroids[2]) / 2, mean_largest)
    assert not torch.equal(centroids[1], centroids[2])
    # the two halves share the split cluster's members (Hartigan weighs the next step with them)
    assert sizes.tolist() == [3.0, 2.5, 2.5]


@pytest.mark.parametrize("backend", ["torch", pytest.param("faiss", marks=needs_faiss)])
def test_lightning_kmeans_recovers_planted_clusters(backend):
    points, labels = planted()
    module = fit(points, k=6, epochs=20, backend=backend)
    ids, dist = module.assign(torch.from_numpy(points))
    assert purity(ids.numpy(), labels) == 1.0
    assert 1 <= module.iterations < 20 and module.converged  # stopped by the tolerance
    assert all(a >= b - 1e-6 * a for a, b in zip(module.inertia_curve, module.inertia_curve[1:]))
    # the Lloyd fixed point: every centroid is the mean of its members
    x = torch.from_numpy(points).float()
    for c in range(6):
        torch.testing.assert_close(module.centroids[c].detach(), x[ids == c].mean(0), rtol=1e-3, atol=1e-3)


def test_hartigan_reaches_a_lower_inertia_than_lloyd_and_scikit_learn():
    """Small overlapping clusters (15 points each), where Lloyd's rule stops early: the default
    (Hartigan, then Lloyd) ends >= 2 % below Lloyd alone and scikit-learn's KMeans (k-means++,
    n_init 1), and as Lloyd's fixed point (every centroid the mean of its nearest points)."""
    sklearn = pytest.importorskip("sklearn.cluster")
    points = unit_noise(1500, 16, seed=0)
    hartigan = fit(points, k=100, epochs=100, backend="torch")
    lloyd = fit(points, k=100, epochs=100, backend="torch", algorithm="lloyd")
    reference = sklearn.KMeans(100, init="k-means++", n_init=1, random_state=0).fit(points.astype(np.float32))
    assert hartigan.converged and hartigan.phase == "lloyd" and lloyd.converged
    assert inertia_of(points, hartigan.centroids) < 0.98 * min(inertia_of(points, lloyd.centroids), reference.inertia_)
    x = torch.from_numpy(points).float()
    ids, _ = torch_assign(x, hartigan.centroids.detach())
    means = torch.zeros(100, 16).index_add_(0, ids, x) / torch.bincount(ids, minlength=100).clamp_min(1)[:, None]
    torch.testing.assert_close(hartigan.centroids.detach()[torch.bincount(ids, minlength=100) > 0],
                               means[torch.bincount(ids, minlength=100) > 0], rtol=1e-3, atol=2e-3)


class _FloodedKMeans(KMeansModule):
    """Fakes cluster sizes of 2 before iteration 3, so that Hartigan's rule sends nearly every point
    to its second-nearest centroid; records the centroids after each iteration."""

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.current_epoch == 2:
            self.cluster_sizes.fill_(2.0)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self.history = getattr(self, "history", []) + [self.centroids.detach().clone()]


def test_a_hartigan_iteration_that_raises_the_inertia_is_undone():
    points = unit_noise(1500, 16, seed=1)
    module = fit(points, k=50, epochs=8, backend="torch", tolerance=0.0, module_class=_FloodedKMeans)
    curve = module.inertia_curve
    assert curve[3] > curve[2]  # the flooded iteration's centroids were worse ...
    torch.testing.assert_close(module.history[3], module.history[1])  # ... so they were replaced by the previous ones
    assert module.phase == "lloyd" and curve[4] == pytest.approx(curve[2])
    assert all(a >= b for a, b in zip(curve[4:], curve[5:]))  # Lloyd from there: monotone


def test_killed_fit_resumes_from_checkpoint(tmp_path):
    points, _ = planted(num_points=1500, k=8, spread=1.0)  # overlapping: many iterations
    straight = fit(points, k=8, epochs=6, tolerance=0.0, backend="torch")
    fit(points, k=8, epochs=3, tolerance=0.0, backend="torch", tmp_path=tmp_path)
    resumed = fit(points, k=8, epochs=6, tolerance=0.0, backend="torch", ckpt_path=tmp_path / "last.ckpt")
    assert resumed.iterations == 6
    torch.testing.assert_close(resumed.centroids.detach(), straight.centroids.detach())
    assert resumed.inertia_curve == pytest.approx(straight.inertia_curve)


class _ShardedPoints(L.LightningDataModule):
    def __init__(self, points: np.ndarray) -> None:
        super().__init__()
        self.points = points

    def setup(self, stage: str) -> None:
        self.dataset = EmbeddingBatches(self.points, None, 250, self.trainer.global_rank, self.trainer.world_size)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=None)


@pytest.mark.parametrize("algorithm", ["hartigan", "lloyd"])
def test_two_process_ddp_equals_one_process(algorithm):
    """DDP on gloo (2 forked CPU processes): each rank sums its shard; the all-reduced updates
    equal the single-process fit. A rank that saw every row would double the inertia; padded
    (repeated) rows would move the centroids; Hartigan steps need the all-reduced sizes."""
    points, _ = planted(num_points=2000, k=8, spread=1.5)
    results = []
    for devices in (1, 2):
        L.seed_everything(7)
        module = KMeansModule(num_clusters=8, embedding_dim=points.shape[1], backend="torch", tolerance=0.0,
                              algorithm=algorithm)
        trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp_fork" if devices > 1 else "auto",
                            max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.fit(module, datamodule=_ShardedPoints(points))
        results.append(module)
    single, ddp = results
    assert ddp.iterations == single.iterations == 4
    torch.testing.assert_close(ddp.centroids.detach(), single.centroids.detach(), rtol=1e-5, atol=1e-5)
    assert ddp.inertia_curve == pytest.approx(single.inertia_curve, rel=1e-6)


def test_embedding_batches_shards_cover_every_row_once():
    points = np.arange(1003 * 2, dtype=np.float16).reshape(1003, 2)
    rows = np.arange(3, 1000, 2)
    seen, steps = [], []
    for rank in range(3):  # 499 rows = 8 batches of 64 over 3 ranks: 3 + 3 + 2, the last one padded
        batches = list(EmbeddingBatches(points, rows, 64, rank, 3))
        steps.append(len(batches))
        seen.extend(torch.cat(batches)[:, 0].tolist())
    assert sorted(seen) == points[rows, 0].tolist()
    assert steps == [3, 3, 3]  # equal steps per rank: per-step collectives never hang
