"""Training loaders that resume mid-epoch on the very batch an interrupted run would have seen next.

Lightning checkpoints the state of a loader that has `state_dict`/`load_state_dict`; with the
shuffle depending only on (seed, epoch), a run killed mid-epoch and resumed from its checkpoint
trains on the same batches, in the same order, as one that was never interrupted.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from planner_lm.errors import UserError


class EpochSeededSampler(DistributedSampler):
    """One process's share of a shuffle that depends only on (seed, epoch), so a resumed run sees
    the same order; the whole shuffle on a single process (rank 0 of 1).

    The permutation is dealt to the processes in turn (DistributedSampler's rule), so N processes
    loading batch/N each together see the batches one process would. Being a `DistributedSampler`,
    Lightning keeps it under DDP rather than swapping in its own, which would restart an interrupted
    epoch from its beginning. `start` skips this process's first examples of the next pass (set when
    resuming mid-epoch).
    """

    def __init__(self, data_source: Dataset, seed: int, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(data_source, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.start = 0

    def __iter__(self):
        start, self.start = self.start, 0
        yield from list(super().__iter__())[start:]


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning can checkpoint mid-epoch (`state_dict` / `load_state_dict`).

    It counts the batches handed to training in the current pass; after a restore the sampler
    skips that many batches, so a resumed run continues with the very batches it would have seen.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batches_done = 0
        self._resume_from = 0

    def __iter__(self):
        done, self._resume_from = self._resume_from, 0
        if done and isinstance(self.sampler, EpochSeededSampler):
            self.sampler.start = done * self.batch_size
        self._batches_done = done
        for batch in super().__iter__():
            self._batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"batches_done": self._batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_from = int(state.get("batches_done", 0))


def process_of(datamodule: Any) -> tuple[int, int]:
    """(global rank, world size) of the attached trainer, i.e. which share of each optimizer step's
    batch this process loads; (0, 1) when no trainer is attached."""
    trainer = getattr(datamodule, "trainer", None)
    return (int(trainer.global_rank), int(trainer.world_size)) if trainer is not None else (0, 1)


def per_device_batch(global_batch: int, world_size: int) -> int:
    """Examples each process loads per step so that one optimizer step sees `global_batch` in all.

    The configs' `batch_size` is the global batch (the paper's 32 windows per step), so a run on 1
    or N devices takes the same steps over the same data; it must divide evenly.
    """
    if world_size < 1 or global_batch % world_size:
        raise UserError(f"data.batch_size {global_batch} is the global batch per optimizer step and must be a "
                        f"multiple of the number of processes ({world_size}); choose e.g. "
                        f"{max(world_size, global_batch - global_batch % world_size)}")
    return global_batch // world_size


def resumable_train_loader(data: Dataset, batch_size: int, seed: int | None, *, collate_fn: Callable | None = None,
                           num_workers: int = 0, process: tuple[int, int] = (0, 1)) -> ResumableLoader:
    """Shuffled training loader that resumes mid-epoch; `seed` None: torch's seed (the run's
    `seed_everything`, which LightningCLI applies before building the data module).

    `batch_size` is the global batch: each of the world's processes (`process`: rank, world size)
    loads its share, and together they see the batches a single process would, also after a
    resume mid-epoch."""
    if seed is None:
        seed = torch.initial_seed() % 2**31
    rank, world_size = process
    return ResumableLoader(data, batch_size=per_device_batch(batch_size, world_size),
                           sampler=EpochSeededSampler(data, seed, rank, world_size), collate_fn=collate_fn, num_workers=num_workers,
                           persistent_workers=num_workers > 0, drop_last=False)
