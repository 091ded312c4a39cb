"""Sentence embeddings (`1_embed/embeddings.npy`) as batches for k-means, sharded over ranks.

`EmbeddingBatches` streams rows of a (memory-mapped) matrix in fixed-size batches. It is an
`IterableDataset` that shards itself (each rank gets a contiguous range of batches, each rank
exactly once), so Lightning never wraps it in a `DistributedSampler`, whose padding would count
some rows twice in the k-means sums. Memory is bounded by a batch, not by the corpus.

`ClusterDataModule` opens the embed stage through its manifest, checks it against the prepared
corpus, and feeds training sentences (optionally a seeded subsample) to the k-means module.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from planner_lm.artifacts import Manifest
from planner_lm.errors import UserError
from planner_lm.run_folder import RunFolder
from planner_lm.seeding import global_seed

# EmbeddingBatches shards itself per rank and per DataLoader worker, so its __len__ is exact.
warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__` defined.*")


def open_embeddings(source: str | os.PathLike | np.ndarray) -> np.ndarray:
    """A read-only view of an embedding matrix: memory-mapped when given a `.npy` path."""
    if isinstance(source, np.ndarray):
        return source
    return np.load(source, mmap_mode="r")


class EmbeddingBatches(IterableDataset):
    """Fixed-size batches of selected rows of an embedding matrix, as stored (usually float16).

    Args:
        source: path of a `.npy` file (memory-mapped lazily, so the dataset pickles cheaply for
            spawned processes and workers) or an in-memory array.
        rows: sorted row indices to visit (None = all rows).
        batch_size: rows per batch.
        rank / world_size: this process's shard; see `set_shard`.
    """

    def __init__(
        self,
        source: str | os.PathLike | np.ndarray,
        rows: np.ndarray | None = None,
        batch_size: int = 65536,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        self.source = source if isinstance(source, np.ndarray) else str(source)
        self._array: np.ndarray | None = source if isinstance(source, np.ndarray) else None
        self.num_rows_total = int(open_embeddings(self.source).shape[0])
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        # A contiguous row range is read by slicing (sequential I/O) instead of fancy indexing.
        self._first_row: int | None = 0 if self.rows is None else None
        if self.rows is not None and len(self.rows) and self.rows[-1] - self.rows[0] + 1 == len(self.rows):
            self._first_row = int(self.rows[0])
        self.batch_size = batch_size
        self.set_shard(rank, world_size)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if not isinstance(self.source, np.ndarray):
            state["_array"] = None  # re-open the memory map in the receiving process
        return state

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = open_embeddings(self.source)
        return self._array

    @property
    def num_rows(self) -> int:
        """Rows visited by all shards together."""
        return self.num_rows_total if self.rows is None else len(self.rows)

    @property
    def num_batches(self) -> int:
        return math.ceil(self.num_rows / self.batch_size)

    def set_shard(self, rank: int, world_size: int) -> None:
        """Visit only batches [rank·B/W, (rank+1)·B/W): contiguous ranges read the file sequentially."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.rank, self.world_size = rank, world_size
        start = (self.num_batches * rank) // world_size
        stop = (self.num_batches * (rank + 1)) // world_size
        self.batch_range = range(start, stop)
        # every rank takes the same number of steps (empty batches pad the shorter shards): a
        # per-step collective, such as the checkpoint callback's "is a save due?", must meet
        # the same call on every rank or the ranks hang
        self.steps_per_rank = math.ceil(self.num_batches / world_size)

    def __len__(self) -> int:
        return self.steps_per_rank

    def batch(self, index: int) -> torch.Tensor:
        lo = index * self.batch_size
        hi = min(lo + self.batch_size, self.num_rows)
        if self._first_row is not None:
            block = self.array[self._first_row + lo : self._first_row + hi]
        else:
            block = self.array[self.rows[lo:hi]]
        return torch.from_numpy(np.array(block, copy=True))  # copy: memory maps are read-only

    def __iter__(self):
        batches: list[int | None] = list(self.batch_range)
        batches += [None] * (self.steps_per_rank - len(batches))
        worker = get_worker_info()
        if worker is not None:  # split this rank's batches over DataLoader workers
            batches = batches[worker.id :: worker.num_workers]
        for index in batches:
            yield self.batch(index) if index is not None else self.empty_batch()

    def empty_batch(self) -> torch.Tensor:
        """A batch of no rows (pads a shard that has fewer batches than the others)."""
        return torch.from_numpy(np.zeros((0, self.array.shape[1]), dtype=self.array.dtype))

    def sample(self, size: int, seed: int) -> torch.Tensor:
        """A seeded random subset of `size` visited rows (all ranks draw the same), float32."""
        rng = np.random.default_rng(seed)
        size = min(size, self.num_rows)
        picks = np.sort(rng.choice(self.num_rows, size=size, replace=False))
        if self.rows is not None:
            picks = self.rows[picks]
        return torch.from_numpy(np.asarray(self.array[picks], dtype=np.float32))


def check_finite(array: np.ndarray, what: str, rows_per_chunk: int = 1 << 20) -> None:
    """Raise a UserError naming the first row holding NaN or infinity (chunked, bounded memory)."""
    for lo in tqdm(range(0, array.shape[0], rows_per_chunk), desc="checking embeddings", unit="chunk",
                   leave=False, disable=array.shape[0] <= rows_per_chunk):
        chunk = np.asarray(array[lo : lo + rows_per_chunk])
        bad = ~np.isfinite(chunk).all(axis=1)
        if bad.any():
            row = lo + int(np.argmax(bad))
            raise UserError(
                f"{what} has NaN or infinite values (first at row {row}, "
                f"{int(bad.sum())} rows in rows {lo}..{lo + len(chunk) - 1}); re-run `make embed`"
            )


class ClusterDataModule(LightningDataModule):
    """Training-sentence embeddings for k-means, read from the embed stage of a run.

    Args:
        run_dir: run directory holding `0_prepare` and `1_embed` (set from the stage's --run_dir).
        batch_size: embeddings per k-means step; memory per step is about
            batch_size × (dim + num_clusters) × 4 bytes.
        fit_sample_size: fit on a seeded random subsample of this many training sentences
            (None = all of them); every sentence is still assigned an action at the end.
        num_workers: DataLoader worker processes reading the memory-mapped file.
    """

    def __init__(
        self,
        run_dir: str = "runs/demo",
        batch_size: int = 65536,
        fit_sample_size: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.batch_size = batch_size
        self.fit_sample_size = fit_sample_size
        self.num_workers = num_workers
        folder = RunFolder(run_dir)
        self.prepared = folder.prepared
        self.embed_manifest: Manifest = folder.embed_manifest()
        self.inputs = {"prepare": self.prepared.dir, "embed": self.embed_manifest.dir}
        self.embeddings_path = folder.embeddings_path
        self.embedding_dim = int(self.embed_manifest.fact("embedding_dim"))
        self.num_sentences = int(self.embed_manifest.fact("num_sentences"))
        self.train_range = self.prepared.sentence_range("train")
        shape = open_embeddings(self.embeddings_path).shape
        if tuple(shape) != (self.num_sentences, self.embedding_dim):
            raise UserError(
                f"{self.embeddings_path} has shape {tuple(shape)} but its manifest says "
                f"({self.num_sentences}, {self.embedding_dim}); re-run `make embed`"
            )

    @property
    def num_fit_rows(self) -> int:
        lo, hi = self.train_range
        return min(hi - lo, self.fit_sample_size) if self.fit_sample_size else hi - lo

    def fit_rows(self, seed: int) -> np.ndarray | None:
        """Row ids k-means is fitted on: the training sentences or a seeded sample of them."""
        lo, hi = self.train_range
        if self.fit_sample_size is None or self.fit_sample_size >= hi - lo:
            return np.arange(lo, hi, dtype=np.int64)
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(np.arange(lo, hi), size=self.fit_sample_size, replace=False))

    def validate(self, num_clusters: int) -> None:
        """Refuse impossible settings and corrupt embeddings before any heavy work."""
        if self.fit_sample_size is not None and self.fit_sample_size < 1:
            raise UserError(f"data.fit_sample_size must be >= 1 or null, got {self.fit_sample_size}")
        if num_clusters > self.num_fit_rows:
            raise UserError(
                f"cannot make {num_clusters} clusters from {self.num_fit_rows} training sentences; lower "
                f"model.num_clusters (--model.num_clusters) or use a larger corpus / fit_sample_size"
            )
        check_finite(open_embeddings(self.embeddings_path), str(self.embeddings_path))

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self.fit_dataset = EmbeddingBatches(self.embeddings_path, self.fit_rows(global_seed()), self.batch_size, rank, world)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.fit_dataset, batch_size=None, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def all_rows(self) -> EmbeddingBatches:
        """Every sentence (all splits), unsharded: for the final assignment."""
        return EmbeddingBatches(self.embeddings_path, None, self.batch_size)
