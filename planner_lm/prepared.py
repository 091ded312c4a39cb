"""The prepared corpus (`0_prepare/`): documents split into train/val/test, with sentence spans.

Written by the `prepare` stage (`planner_lm.pipeline.prepare`) and read by every later stage
through `PreparedCorpus`. Layout and column meanings are documented in docs/DEVELOPING.md.
Sentence ids are global and contiguous (train, then val, then test) so embeddings and actions are plain arrays indexed by id.
"""
from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

import numpy as np

from planner_lm.artifacts import read_manifest
from planner_lm.errors import UserError

SPLITS = ("train", "val", "test")
STAGE = "prepare"


class PreparedCorpus:
    """Read access to `0_prepare/`; validates the manifest on open."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.manifest = read_manifest(self.dir, STAGE)

    @property
    def num_sentences(self) -> int:
        return int(self.manifest.fact("num_sentences"))

    def split(self, name: str):
        """The documents of one split as a `datasets.Dataset`."""
        import datasets

        if name not in SPLITS:
            raise UserError(f"unknown split '{name}'; choose one of {', '.join(SPLITS)}")
        return datasets.load_from_disk(str(self.dir / name))

    def sentence_range(self, name: str) -> tuple[int, int]:
        """[first, last + 1) global sentence ids of a split."""
        info = self.manifest.fact("splits")[name]
        return info["first_sentence"], info["first_sentence"] + info["sentences"]

    def doc_bounds(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(first sentence id, number of sentences) of every document of a split."""
        table = self.split(name).data
        first = np.asarray(table.column("first_sentence").to_numpy(), dtype=np.int64)
        starts = table.column("sent_start").combine_chunks()
        counts = np.diff(np.asarray(starts.offsets.to_numpy(), dtype=np.int64))
        return first, counts

    @cached_property
    def sentence_doc_first(self) -> np.ndarray:
        """For every global sentence id, the id of its document's first sentence."""
        out = np.empty(self.num_sentences, dtype=np.int64)
        for name in SPLITS:
            first, counts = self.doc_bounds(name)
            lo, hi = self.sentence_range(name)
            out[lo:hi] = np.repeat(first, counts)
        return out

    def sentence_texts(self, split: str | None = None) -> list[str]:
        """Sentence strings in global id order (one split, or all)."""
        texts: list[str] = []
        for name in ([split] if split else SPLITS):
            table = self.split(name).data
            for text, starts, ends in zip(table.column("text").to_pylist(),
                                          table.column("sent_start").to_pylist(),
                                          table.column("sent_end").to_pylist()):
                texts.extend(text[a:b] for a, b in zip(starts, ends))
        return texts
