"""Crash safety for every training stage: atomic resumable checkpoints, per-batch seeding, NaN stops.

`ResumeCheckpoint` replaces Lightning's `ModelCheckpoint` for our stages because resuming after a
SIGKILL needs three things that one does not give together:

- the file is replaced atomically (written beside `last.ckpt`, then renamed), so a kill while
  saving leaves the previous checkpoint intact instead of a truncated one;
- saves happen every N optimizer steps and/or every few minutes, at each validation and at each
  epoch end, so a kill loses little work whatever the schedule;
- with `StepSeed` (random numbers drawn per batch from the batch's position) and the stateful
  loaders of `data/resumable.py` (the same batches in the same order), a resumed run ends with
  the weights of an uninterrupted one.

`FiniteLossGuard` stops training at the first NaN/inf training loss, naming the step, before the
checkpoint of that step is written: the last checkpoint on disk is the last good one.

Checkpoints are never unpickled: they hold only tensors and plain values, every stage resumes
with `trainer.fit(..., weights_only=True)`, and `check_checkpoint` turns a file that holds
anything else (or no checkpoint at all) into one sentence before training starts.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import random
import re
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint

from planner_lm.errors import UserError
from planner_lm.seeding import global_seed

LAST_CHECKPOINT = "last.ckpt"
PARTIAL_CHECKPOINT = f".{LAST_CHECKPOINT}.partial"  # written beside it, then renamed over it


class StepSeed(L.Callback):
    """Seed Python, NumPy and torch from (run seed, epoch, batch, rank) before every training batch.

    Dropout masks and Gumbel noise then depend only on where training is, not on everything that
    drew random numbers before (data loader iterators, sanity checks, validation): a run resumed
    from any checkpoint draws exactly what the uninterrupted run drew at the same batch.
    """

    def __init__(self) -> None:
        self.base_seed = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.base_seed = global_seed(default=torch.initial_seed() % 2**32)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        key = f"{self.base_seed}:{trainer.current_epoch}:{batch_idx}:{trainer.global_rank}".encode()
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little")
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # also seeds every CUDA device


class ResumeCheckpoint(Checkpoint):
    """Keep `<dirpath>/last.ckpt` = the latest training state, replaced atomically.

    Args:
        dirpath: the stage's `checkpoints/` directory.
        every_n_steps: also save every this many optimizer steps (0: not by step count).
        every_minutes: also save when this many minutes passed since the last save (0: not by time).
    """

    def __init__(self, dirpath: str | os.PathLike, every_n_steps: int = 0, every_minutes: float = 10.0) -> None:
        if every_n_steps < 0 or every_minutes < 0:
            raise UserError("checkpoint intervals must be >= 0 (0 turns that trigger off)")
        self.dirpath = Path(dirpath)
        self.every_n_steps = int(every_n_steps)
        self.every_minutes = float(every_minutes)
        self.saved_step: int | None = None
        self._saved_at = time.monotonic()

    @property
    def last_path(self) -> Path:
        return self.dirpath / LAST_CHECKPOINT

    # ------------------------------------------------------------------ triggers
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._saved_at = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self.saved_step:
            return
        due = bool(self.every_n_steps) and step % self.every_n_steps == 0
        due = due or (self.every_minutes > 0 and time.monotonic() - self._saved_at >= 60 * self.every_minutes)
        if trainer.strategy.broadcast(due):  # rank 0's clock decides, so every rank saves together
            self.save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit" and trainer.global_step != self.saved_step:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)  # the epoch loop's own progress changes here even if the step did not

    # ------------------------------------------------------------------ saving
    def save(self, trainer: L.Trainer) -> None:
        """Write the checkpoint beside `last.ckpt`, then rename it over (rank 0 writes)."""
        partial = self.dirpath / PARTIAL_CHECKPOINT
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
        # the full training state (optimizer, loops, callbacks): said explicitly, so Lightning
        # does not log that it defaulted to it at every save
        trainer.save_checkpoint(partial, weights_only=False)
        if trainer.is_global_zero:
            os.replace(partial, self.last_path)
        trainer.strategy.barrier("resume checkpoint saved")
        self.saved_step = trainer.global_step
        self._saved_at = time.monotonic()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.saved_step = int(checkpoint.get("global_step", 0))


def check_checkpoint(path: Path) -> None:
    """Read `path` the way a resume will (`weights_only=True`, memory-mapped: tensors and plain values only,
    no pickled object is ever built) and turn a refusal into one `UserError` before any training."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"a pickled {found.group(1)}" if found else "pickled objects"
        raise UserError(f"{path} holds {what} besides tensors and plain values, which this project never writes, so "
                        f"it is not loaded; delete {path.parent} to start the stage over") from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable checkpoint ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); delete {path.parent} to start the stage over") from err


class FiniteLossGuard(L.Callback):
    """Stop at the first non-finite training loss with a message that names the step.

    Runs before `ResumeCheckpoint` (Lightning calls checkpoint callbacks last), so the weights
    that produced the NaN are never saved over the last good checkpoint.
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        bad = not bool(torch.isfinite(loss.detach()).all())
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):
            return
        value = "nan" if bool(torch.isnan(loss.detach()).any()) else "inf"
        saver = next((cb for cb in trainer.callbacks if isinstance(cb, ResumeCheckpoint)), None)
        if saver is not None and saver.saved_step is not None and saver.last_path.is_file():
            kept = f"the last good checkpoint (step {saver.saved_step}) is kept at {saver.last_path}"
        else:
            kept = "no checkpoint had been written yet"
        raise UserError(
            f"the training loss became {value} at step {trainer.global_step} (epoch {trainer.current_epoch}, "
            f"batch {batch_idx}); training stopped and {kept}. Lower the learning rate (--model.lr) or check the "
            "inputs, then run the stage again"
        )
