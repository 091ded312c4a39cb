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
from planner_lm.models.kmeans import (
    FaissAssigner,
    faiss_available,
    initial_centroids,
    kmeans_plusplus_init,
    resolve_backend,
    torch_assign,
    update_centroids,
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


def fit(points: np.ndarray, k: int, epochs: int, tmp_path=None, ckpt_path=None, **module_kwargs) -> KMeansModule:
    L.seed_everything(3)
    module = KMeansModule(num_clusters=k, embedding_dim=points.shape[1], **module_kwargs)
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


def test_update_moves_to_means_and_splits_the_largest_cluster_into_empty_ones():
    previous = torch.zeros(3, 4)
    sums = torch.tensor([[3.0, 3, 3, 3], [0, 0, 0, 0], [10, 5, 0, -5]], dtype=torch.float64)
    counts = torch.tensor([3.0, 0.0, 5.0], dtype=torch.float64)
    centroids, reseeded = update_centroids(sums, counts, previous)
    assert reseeded == 1
    torch.testing.assert_close(centroids[0], torch.ones(4))
    mean_largest = torch.tensor([2.0, 1.0, 0.0, -1.0])
    # the empty cluster and the largest one straddle the largest one's mean
    torch.testing.assert_close((centroids[1] + centroids[2]) / 2, mean_largest)
    assert not torch.equal(centroids[1], centroids[2])


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


def test_two_process_ddp_equals_one_process():
    """DDP on gloo (2 forked CPU processes): each rank sums its shard; the all-reduced updates
    equal the single-process fit. A rank that saw every row would double the inertia; padded
    (repeated) rows would move the centroids."""
    points, _ = planted(num_points=2000, k=8, spread=1.5)
    results = []
    for devices in (1, 2):
        L.seed_everything(7)
        module = KMeansModule(num_clusters=8, embedding_dim=points.shape[1], backend="torch", tolerance=0.0)
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
