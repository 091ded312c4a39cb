"""Data for planner pretraining: one example per sentence, its action as the target.

The context of sentence `j` is the cached embeddings of the previous <= S sentences of its
document (`gather_contexts`), read from `1_embed/embeddings.npy` through a memory map, so
nothing is re-encoded. Targets are the k-means actions of `2_cluster/actions.npy`.
The upstream manifests are checked against each other before any data is read, and the facts
the model needs (`num_actions`, `embedding_dim`, the codebook) become attributes that the stage
CLI links into the model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from planner_lm.data.contexts import gather_contexts
from planner_lm.data.resumable import process_of, resumable_train_loader
from planner_lm.errors import UserError
from planner_lm.evaluation.planner_metrics import action_baselines, previous_actions
from planner_lm.run_folder import RunFolder
from planner_lm.seeding import global_seed



class SentenceTargets(Dataset):
    """The global sentence ids of one split; the collator turns a batch of them into tensors."""

    def __init__(self, sentence_ids: np.ndarray) -> None:
        self.sentence_ids = sentence_ids

    def __len__(self) -> int:
        return len(self.sentence_ids)

    def __getitem__(self, index: int) -> int:
        return int(self.sentence_ids[index])


class PlannerBatchCollator:
    """Sentence ids -> `context [B,S,D]`, `mask [B,S]`, `target [B]`, `previous [B]` (-1 at a document start).

    Opens the memory maps lazily so that DataLoader workers (fork or spawn) never copy them.
    """

    def __init__(self, embeddings_path: Path, actions_path: Path, doc_first: np.ndarray, context_sentences: int) -> None:
        self.embeddings_path, self.actions_path = Path(embeddings_path), Path(actions_path)
        self.doc_first = doc_first
        self.context_sentences = context_sentences
        self._embeddings: np.ndarray | None = None
        self._actions: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_embeddings": None, "_actions": None}

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        if self._embeddings is None:
            self._embeddings = np.load(self.embeddings_path, mmap_mode="r")
            self._actions = np.load(self.actions_path, mmap_mode="r")
        return self._embeddings, self._actions  # type: ignore[return-value]

    def __call__(self, sentence_ids: list[int]) -> dict[str, torch.Tensor]:
        embeddings, actions = self._open()
        ids = np.asarray(sentence_ids, dtype=np.int64)
        first = self.doc_first[ids]
        context, mask = gather_contexts(embeddings, torch.from_numpy(ids), torch.from_numpy(first), self.context_sentences)
        previous = previous_actions(actions, ids, self.doc_first, -1)
        return {
            "sentence": torch.from_numpy(ids),
            "context": context,
            "mask": mask,
            "target": torch.from_numpy(np.asarray(actions[ids], dtype=np.int64)),
            "previous": torch.from_numpy(previous.astype(np.int64)),
        }


class PlannerDataModule(L.LightningDataModule):
    """Sentences of the prepared corpus with their cached contexts and k-means actions.

    Args:
        run_dir: run directory holding 0_prepare, 1_embed and 2_cluster.
        context_sentences: previous sentences of the document in each example's context (S); the
            planner is built for this many (6 cover about the paper's 128 tokens).
        batch_size: training sentences per optimizer step over all devices (paper: 32; each of N processes loads 1/N).
        eval_batch_size: validation examples per batch; default 8 x `batch_size`.
        max_train_sentences: train on a seeded random subset of at most this many sentences
            (None = all).
        max_val_sentences: validate on a seeded random subset of at most this many sentences
            (None = all).
        expected_num_actions: if set, the number of actions k the cluster stage must have
            produced; a different k stops the run before training (k itself always comes from
            the cluster manifest).
        num_workers: DataLoader worker processes.
        seed: seed of the per-epoch shuffle and of the subsets; default: the run's
            `seed_everything`.
    """

    def __init__(
        self,
        run_dir: str = "runs/demo",
        context_sentences: int = 6,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        max_train_sentences: int | None = None,
        max_val_sentences: int | None = None,
        expected_num_actions: int | None = None,
        num_workers: int = 0,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise UserError(f"data.batch_size must be at least 1, got {batch_size}")
        if context_sentences < 0:
            raise UserError(f"context_sentences must be >= 0, got {context_sentences}")
        self.run_dir = Path(run_dir)
        self.context_sentences = context_sentences
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 8 * batch_size
        self.max_train_sentences, self.max_val_sentences = max_train_sentences, max_val_sentences
        self.num_workers, self.seed = num_workers, int(global_seed() if seed is None else seed) % 2**31

        self.folder = RunFolder(self.run_dir)
        self.prepared, self.cluster_manifest = self.folder.prepared, self.folder.cluster_manifest()
        self.embed_manifest = self.folder.embed_manifest()
        self.num_actions, self.embedding_dim = self.folder.num_actions, self.folder.embedding_dim
        if expected_num_actions is not None and expected_num_actions != self.num_actions:
            raise UserError(
                f"the config expects k={expected_num_actions} actions but {self.cluster_manifest.dir} holds "
                f"k={self.num_actions}; re-run `make cluster` with that k or drop data.expected_num_actions"
            )
        self.centroids = self._load_centroids()
        self.inputs = {"prepare": self.prepared.dir, "embed": self.embed_manifest.dir, "cluster": self.cluster_manifest.dir}
        self.upstream_hashes = {
            "prepare": self.prepared.manifest.hash, "embed": self.embed_manifest.hash, "cluster": self.cluster_manifest.hash,
        }
        self._ids: dict[str, np.ndarray] = {}
        self.baselines: dict[str, float] = {}

    def _load_centroids(self) -> torch.Tensor:
        centroids = self.folder.codebook()
        if centroids.shape != (self.num_actions, self.embedding_dim):
            raise UserError(
                f"{self.folder.codebook_path} has shape {centroids.shape}, its manifest says "
                f"({self.num_actions}, {self.embedding_dim}); re-run `make cluster`"
            )
        return torch.from_numpy(centroids)

    def _split_ids(self, split: str, limit: int | None) -> np.ndarray:
        lo, hi = self.prepared.sentence_range(split)
        ids = np.arange(lo, hi, dtype=np.int64)
        if limit is not None and limit < len(ids):
            rng = np.random.default_rng(self.seed + (0 if split == "train" else 1))
            ids = np.sort(rng.choice(ids, size=limit, replace=False))
        if len(ids) == 0:
            raise UserError(f"the {split} split has no sentences; prepare a larger corpus or change the split sizes")
        return ids

    def setup(self, stage: str | None = None) -> None:
        if self._ids:
            return
        self._ids = {"train": self._split_ids("train", self.max_train_sentences),
                     "val": self._split_ids("val", self.max_val_sentences)}
        doc_first = self.folder.doc_first
        actions_path = self.folder.actions_path
        actions = self.folder.actions()
        if len(actions) != self.prepared.num_sentences:
            raise UserError(f"{actions_path} has {len(actions)} rows for {self.prepared.num_sentences} sentences; re-run `make cluster`")
        high = int(np.max(actions)) if len(actions) else 0
        if high >= self.num_actions or int(np.min(actions)) < 0:
            raise UserError(f"{actions_path} holds action ids outside [0, {self.num_actions}); re-run `make cluster`")
        self.collate = PlannerBatchCollator(self.folder.embeddings_path, actions_path, doc_first,
                                            self.context_sentences)
        self.baselines = action_baselines(np.asarray(actions), self._ids["train"], self._ids["val"], doc_first,
                                          self.num_actions)

    @property
    def num_train(self) -> int:
        return len(self._ids["train"])

    @property
    def num_val(self) -> int:
        return len(self._ids["val"])

    def train_dataloader(self) -> DataLoader:
        data = SentenceTargets(self._ids["train"])
        return resumable_train_loader(data, self.batch_size, self.seed, collate_fn=self.collate,
                                      num_workers=self.num_workers, process=process_of(self))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(SentenceTargets(self._ids["val"]), batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=self.collate, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

