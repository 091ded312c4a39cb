"""k-means as a LightningModule: one training epoch is one k-means iteration.

Each `training_step` assigns a batch of embeddings to a centroid and adds the batch into
per-centroid sums and counts; at the end of the epoch the sums and counts are all-reduced over
ranks and the centroids move to the means. So the same code runs on one CPU, one GPU or many
GPUs/nodes (any Lightning strategy), with memory bounded by one batch.

`algorithm="hartigan"` (default): the first iteration is Lloyd's (nearest centroid); the next
ones use Hartigan's rule (`planner_lm.models.kmeans.hartigan_assign`, weighted by the previous
iteration's cluster sizes), which reaches a lower inertia in fewer iterations. When an iteration
improves the inertia by less than `tolerance` (or makes it worse: the centroids then go back to
the previous ones), the iterations continue as Lloyd's until they improve it by less than
`tolerance`, so the codebook ends as Lloyd's (each centroid the mean of its nearest points).
`algorithm="lloyd"`: Lloyd iterations only. Iterations also stop at `trainer.max_epochs`.

Centroids, cluster sizes, the phase, the iteration count and the inertia curve are in the
checkpoint, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule

from planner_lm.models.kmeans import (
    AssignmentBackend,
    Assigner,
    InitMethod,
    accumulate,
    hartigan_assign,
    initial_centroids,
    lloyd_update,
    make_assigner,
    resolve_backend,
)
from planner_lm.seeding import global_seed

Algorithm = Literal["hartigan", "lloyd"]


class KMeansModule(LightningModule):
    """k-means (Hartigan then Lloyd iterations, or Lloyd only) over the training dataloader's batches.

    Args:
        num_clusters: k, the number of writing actions (the codebook size; 1024 in the papers).
        embedding_dim: dimension of the sentence embeddings (read from the embed stage).
        init: "kmeans++" (greedy k-means++ as in scikit-learn) or "random" (k distinct sample
            rows, as FAISS does), computed on a seeded sample of the training embeddings.
        init_sample_size: rows in the init sample. Up to 11,585 rows k-means++ reads the
            sample's pairwise distances (sample² floats, 64 MiB at 4,096 rows), so it costs one
            matmul plus O(k · sample); larger samples cost O(k · sample · dim). A few rows per
            cluster are enough before Hartigan iterations. At least num_clusters rows are used.
        backend: nearest-centroid search of the Lloyd iterations and of `assign`: "auto" (FAISS
            when it serves the device: GPU index on CUDA with faiss-gpu, CPU index on CPU; else
            torch), "faiss" or "torch" (matmul). Hartigan iterations use a torch matmul.
        tolerance: an iteration that lowers the inertia by less than this fraction of it ends
            the Hartigan phase, and then the Lloyd phase (0 = run all `trainer.max_epochs`).
        algorithm: "hartigan" (Hartigan iterations, then Lloyd's; see the module docstring) or
            "lloyd" (Lloyd's only).
    """

    def __init__(
        self,
        num_clusters: int = 1024,
        embedding_dim: int = 384,
        init: InitMethod = "kmeans++",
        init_sample_size: int = 4096,
        backend: AssignmentBackend = "auto",
        tolerance: float = 1e-4,
        algorithm: Algorithm = "hartigan",
    ) -> None:
        super().__init__()
        if num_clusters < 1:
            raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        if algorithm not in ("hartigan", "lloyd"):
            raise ValueError(f"unknown k-means algorithm {algorithm!r}; choose hartigan or lloyd")
        self.save_hyperparameters()
        self.automatic_optimization = False
        # A Parameter (not a buffer) because DistributedDataParallel refuses modules without one
        # that requires grad; it never gets a gradient: every step runs under no_grad.
        self.centroids = torch.nn.Parameter(torch.zeros(num_clusters, embedding_dim))
        self.register_buffer("initialized", torch.tensor(False))
        # the previous iteration's centroids (a Hartigan iteration that raised the inertia is
        # undone) and cluster sizes (Hartigan's weights); zero sizes = no iteration yet
        self.register_buffer("previous_centroids", torch.zeros(num_clusters, embedding_dim))
        self.register_buffer("cluster_sizes", torch.zeros(num_clusters, dtype=torch.float64))
        self.inertia_curve: list[float] = []
        self.reseeded_curve: list[int] = []
        self.phase: Algorithm = algorithm
        self.converged = False
        self._assigner: Assigner | None = None
        self._assigner_device: torch.device | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def seed(self) -> int:
        """The run's seed (`seed_everything`), shared by every rank."""
        return global_seed()

    @property
    def assigner(self) -> Assigner:
        if self._assigner is None or self._assigner_device != self.device:
            self._assigner = make_assigner(self.hparams.backend, self.device)
            self._assigner_device = self.device
        return self._assigner

    @property
    def backend_name(self) -> str:
        return resolve_backend(self.hparams.backend, self.device)

    @torch.no_grad()
    def assign(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest centroid ids and squared distances of a batch (moved to this module's device)."""
        x = x.to(self.device, non_blocking=True).float()
        return self.assigner(x, self.centroids.detach())

    # ------------------------------------------------------------------ Lightning hooks
    def configure_optimizers(self) -> None:
        # Centroids move by the Lloyd update, not by an optimizer; silence Lightning's notice.
        warnings.filterwarnings("ignore", message=".*returned `None`, this fit will run with no optimizer.*")
        return None

    @torch.no_grad()
    def on_train_start(self) -> None:
        if self.converged:  # resumed after the tolerance had already stopped the iterations
            self.trainer.should_stop = True
            return
        if bool(self.initialized):
            return  # resumed from a checkpoint
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        if not hasattr(dataset, "sample"):
            raise TypeError("KMeansModule needs a train dataloader over EmbeddingBatches (with .sample())")
        k = self.hparams.num_clusters
        sample = dataset.sample(max(self.hparams.init_sample_size, k), seed=self.seed)
        if sample.shape[0] < k:
            raise ValueError(f"cannot initialise {k} clusters from {sample.shape[0]} embeddings")
        if sample.shape[1] != self.centroids.shape[1]:
            raise ValueError(f"embeddings have dim {sample.shape[1]}, the model expects {self.centroids.shape[1]}")
        centroids = initial_centroids(sample.to(self.device), k, self.hparams.init, self.seed,
                                      show_progress=self.trainer.is_global_zero)
        # Every rank computed the same thing from the same seed; broadcasting rank 0's copy makes
        # that exact even when kernels are not bitwise deterministic.
        centroids = self.trainer.strategy.broadcast(centroids, src=0)
        self.centroids.copy_(centroids.to(self.device))
        self.initialized.fill_(True)

    def on_train_epoch_start(self) -> None:
        k, d = self.centroids.shape
        self._sums = torch.zeros(k, d, dtype=torch.float64, device=self.device)
        self._counts = torch.zeros(k, dtype=torch.float64, device=self.device)
        self._inertia = torch.zeros((), dtype=torch.float64, device=self.device)
        self._hartigan_epoch = self.phase == "hartigan" and bool(self.cluster_sizes.sum() > 0)

    @property
    def hartigan_step(self) -> bool:
        """True when this iteration uses Hartigan's rule (it needs the previous iteration's sizes)."""
        return getattr(self, "_hartigan_epoch", False)

    @torch.no_grad()
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        x = batch.float()
        if self.hartigan_step:
            ids, distances = hartigan_assign(x, self.centroids.detach(), self.cluster_sizes)
        else:
            ids, distances = self.assigner(x, self.centroids.detach())
        ids = ids.to(self.device)
        accumulate(x, ids, self._sums, self._counts)
        self._inertia += distances.to(self.device).double().sum()

    @torch.no_grad()
    def on_train_epoch_end(self) -> None:
        strategy = self.trainer.strategy
        sums = strategy.reduce(self._sums, reduce_op="sum")
        counts = strategy.reduce(self._counts, reduce_op="sum")
        # inertia here is that of the centroids the epoch started with (nearest-centroid distances)
        inertia = float(strategy.reduce(self._inertia, reduce_op="sum"))
        previous = self.inertia_curve[-1] if self.inertia_curve else None
        hartigan = self.hartigan_step
        self.inertia_curve.append(inertia)
        self.log("train/inertia", inertia, on_epoch=True, sync_dist=True)
        improvement = (previous - inertia) / previous if previous else None
        if improvement is not None:
            self.log("train/relative_improvement", improvement, on_epoch=True, sync_dist=True)
        if hartigan and improvement is not None and improvement < 0:
            # the batch Hartigan step overshot: go back to the better centroids, continue as Lloyd
            self.centroids.copy_(self.previous_centroids)
            self.phase = "lloyd"
            self.reseeded_curve.append(0)
            self.log("train/empty_clusters_reseeded", 0.0, on_epoch=True, sync_dist=True)
            return
        centroids, reseeded, sizes = lloyd_update(sums, counts, self.centroids.detach())
        self.previous_centroids.copy_(self.centroids.detach())
        self.centroids.copy_(centroids)
        self.cluster_sizes.copy_(sizes)
        self.reseeded_curve.append(reseeded)
        self.log("train/empty_clusters_reseeded", float(reseeded), on_epoch=True, sync_dist=True)
        if improvement is None or reseeded:
            return
        if hartigan and (improvement < self.hparams.tolerance or improvement == 0):
            self.phase = "lloyd"  # Hartigan has (nearly) converged: finish with Lloyd iterations
        elif not hartigan and self.hparams.tolerance > 0 and improvement < self.hparams.tolerance:
            self.converged = True
            self.trainer.should_stop = True

    # The curves travel in the state dict (not only in checkpoints) so that they also come back
    # from spawned processes (strategy "ddp_spawn" returns rank 0's state dict to the caller).
    def get_extra_state(self) -> dict[str, Any]:
        return {"inertia_curve": list(self.inertia_curve), "reseeded_curve": list(self.reseeded_curve),
                "converged": self.converged, "phase": self.phase}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.inertia_curve = list(state.get("inertia_curve", []))
        self.reseeded_curve = list(state.get("reseeded_curve", []))
        self.converged = bool(state.get("converged", False))
        self.phase = state.get("phase", self.hparams.algorithm)

    @property
    def iterations(self) -> int:
        """k-means iterations completed (one per epoch)."""
        return len(self.inertia_curve)
