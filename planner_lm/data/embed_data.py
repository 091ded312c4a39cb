"""Sentences of the prepared corpus in length-sorted batches, grouped into resumable shards.

The embed stage encodes every sentence once. Sorting by length puts sentences of similar length
in one batch (little padding); batches are grouped into shards of `shard_batches` batches, the
unit of work that is written to disk (`1_embed/shards/shard_XXXXXX.npy`) and skipped on restart.
The plan (which sentence ids form which batch and shard) is a pure function of the sentence
lengths and the batch settings, and `plan.json` records it, so a resumed run trusts only shards
made under the same plan. Shards are dealt to ranks round-robin; the dataset shards itself
(rank, then DataLoader worker), so Lightning never inserts a sampler that would repeat sentences.
"""

from __future__ import annotations

import fnmatch
import json
import math
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from planner_lm.artifacts import atomic_write_text
from planner_lm.errors import UserError
from planner_lm.run_folder import RunFolder

SHARD_DIR = "shards"
PLAN_FILE = "plan.json"

warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__` defined.*")


def length_sorted_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Ids grouped into batches of similar length, longest first (an out-of-memory error shows at once)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass
class EmbedPlan:
    """Batches (arrays of global sentence ids) and their grouping into shards."""

    batches: list[np.ndarray]
    shard_batches: int

    @property
    def num_shards(self) -> int:
        return math.ceil(len(self.batches) / self.shard_batches)

    def shard_of(self, batch_index: int) -> int:
        return batch_index // self.shard_batches

    def batches_of_shard(self, shard: int) -> range:
        return range(shard * self.shard_batches, min((shard + 1) * self.shard_batches, len(self.batches)))

    def ids_of_shard(self, shard: int) -> np.ndarray:
        return np.concatenate([self.batches[b] for b in self.batches_of_shard(shard)])


def shard_path(shard_dir: Path, shard: int) -> Path:
    return shard_dir / f"shard_{shard:06d}.npy"


def finished_shards(shard_dir: Path, num_shards: int) -> set[int]:
    """Shards already on disk. Files appear only by atomic rename, so any that exists is complete."""
    return {s for s in range(num_shards) if shard_path(shard_dir, s).is_file()}


def reset_shards_if_plan_changed(shard_dir: Path, plan: dict[str, Any]) -> bool:
    """Delete shards written under another plan (or a different encoder); record the plan.

    Returns True when earlier shards are kept for resuming.
    """
    plan_file = shard_dir / PLAN_FILE
    if plan_file.is_file():
        try:
            if json.loads(plan_file.read_text()) == plan:
                return any(shard_dir.glob("shard_*.npy"))
        except json.JSONDecodeError:
            pass
        print(f"{shard_dir} holds shards of another plan or encoder; starting the embedding over")
    remove_shards(shard_dir)
    shard_dir.mkdir(parents=True)
    atomic_write_text(plan_file, json.dumps(plan, indent=2, sort_keys=True) + "\n")
    return False


def remove_shards(shard_dir: Path) -> None:
    """Delete the shards folder: only shards, their temporary files and the plan; any other file
    in it means it is not ours, and it is refused, untouched."""
    if not shard_dir.exists():
        return
    foreign = [p for p in shard_dir.iterdir() if not (p.is_file() and (
        p.name == PLAN_FILE or fnmatch.fnmatchcase(p.name.lstrip("."), "shard_*.npy*") or p.name.startswith(f".{PLAN_FILE}.")))]
    if foreign:
        raise UserError(f"{shard_dir} holds files the embed stage did not write ({foreign[0].name}), so it is left "
                        "alone; move them away and run `make embed` again")
    shutil.rmtree(shard_dir)


class SentenceBatches(IterableDataset):
    """The not-yet-embedded batches of one rank, each as {ids, texts, shard, shard_size}.

    Args:
        texts: every sentence, indexed by global sentence id.
        plan: the batch/shard plan.
        shards: the shards this dataset yields (already finished ones excluded).
    """

    def __init__(self, texts: list[str], plan: EmbedPlan, shards: list[int]) -> None:
        super().__init__()
        self.texts, self.plan, self.shards = texts, plan, shards

    def __len__(self) -> int:
        return sum(len(self.plan.batches_of_shard(s)) for s in self.shards)

    def __iter__(self):
        shards = self.shards
        worker = get_worker_info()
        if worker is not None:  # whole shards per worker, so one worker completes each shard
            shards = shards[worker.id :: worker.num_workers]
        for shard in shards:
            batch_range = self.plan.batches_of_shard(shard)
            for b in batch_range:
                ids = self.plan.batches[b]
                yield {"ids": ids, "texts": [self.texts[i] for i in ids], "shard": shard,
                       "shard_size": len(batch_range), "batch": b}


def _collate_one(item: dict) -> dict:
    return item


class EmbedDataModule(LightningDataModule):
    """Every sentence of the prepared corpus (all splits), for `Trainer.predict`.

    Args:
        run_dir: run directory holding `0_prepare` (set from the stage's --run_dir).
        batch_size: sentences per forward pass (length-sorted, so padding stays small).
        shard_batches: batches per shard file; a killed run loses at most the shards in flight.
        num_workers: DataLoader worker processes (0 = in the main process).
    """

    def __init__(self, run_dir: str = "runs/demo", batch_size: int = 256, shard_batches: int = 64,
                 num_workers: int = 0) -> None:
        super().__init__()
        if batch_size < 1 or shard_batches < 1:
            raise UserError(f"data.batch_size and data.shard_batches must be >= 1, got {batch_size}, {shard_batches}")
        self.run_dir, self.batch_size, self.shard_batches, self.num_workers = run_dir, batch_size, shard_batches, num_workers
        folder = RunFolder(run_dir)
        self.prepared = folder.prepared
        self.num_sentences = self.prepared.num_sentences
        self.inputs = {"prepare": self.prepared.dir}
        if self.num_sentences == 0:
            raise UserError(f"{self.prepared.dir} has no sentences; check the corpus and re-run `make prepare`")
        self.shard_dir = folder.dir("embed") / SHARD_DIR
        self._texts: list[str] | None = None
        self._plan: EmbedPlan | None = None

    @property
    def texts(self) -> list[str]:
        if self._texts is None:
            self._texts = self.prepared.sentence_texts()
            if len(self._texts) != self.num_sentences:
                raise UserError(f"{self.prepared.dir} lists {self.num_sentences} sentences but holds "
                                f"{len(self._texts)}; re-run `make prepare`")
        return self._texts

    @property
    def plan(self) -> EmbedPlan:
        if self._plan is None:
            lengths = np.fromiter((len(t) for t in self.texts), dtype=np.int64, count=len(self.texts))
            self._plan = EmbedPlan(length_sorted_batches(lengths, self.batch_size), self.shard_batches)
        return self._plan

    def plan_record(self, **extra: Any) -> dict[str, Any]:
        """What must match for shards of an earlier run to be reused."""
        return {"num_sentences": self.num_sentences, "batch_size": self.batch_size,
                "shard_batches": self.shard_batches, "prepare": self.prepared.manifest.hash, **extra}

    def pending_shards(self) -> list[int]:
        done = finished_shards(self.shard_dir, self.plan.num_shards)
        return [s for s in range(self.plan.num_shards) if s not in done]

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self.dataset = SentenceBatches(self.texts, self.plan, self.pending_shards()[rank::world])

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=None, collate_fn=_collate_one, num_workers=self.num_workers)


def count_truncated(texts: Sequence[str], tokenizer: Any, max_tokens: int) -> int:
    """How many sentences exceed the encoder's window of `max_tokens` (special tokens included).

    Only sentences whose UTF-8 length could reach the window are tokenized (a token covers at
    least one byte), so this costs little even on millions of sentences.
    """
    candidates = [text for text in texts if len(text.encode("utf-8")) + 4 > max_tokens]
    count = 0
    for start in range(0, len(candidates), 1024):
        encoded = tokenizer(candidates[start:start + 1024], add_special_tokens=True, truncation=False)["input_ids"]
        count += sum(len(ids) > max_tokens for ids in encoded)
    return count
