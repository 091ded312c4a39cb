"""Token cache of a prepared split and the fixed-length LM training windows cut from it.

The cache holds every document of a split tokenized once (see ``planner_lm.tokenization``) as
flat NumPy arrays, so windows are cut on the fly (memory-mapped) instead of being stored:

- ``input_ids.npy`` (int32 ``[tokens]``), ``target_sentence.npy`` (int64 ``[tokens]``, GLOBAL
  sentence id of the sentence each position predicts), ``doc_offsets.npy`` (int64 ``[docs+1]``)
  and ``doc_first_sentence.npy`` (int64 ``[docs]``);
- ``cache.json`` written last: the tokenizer fingerprint and sizes. A folder without it is an
  interrupted build and is rebuilt.

Windows never cross documents. With the paper's 128-token windows and stride 127, consecutive
windows share one token, so every non-BOS token is a label exactly once; with a smaller stride
tokens already labelled by the previous window are masked, so the rule still holds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from planner_lm.errors import UserError
from planner_lm.tokenization import tokenize_documents

__all__ = ["IGNORE_INDEX", "TokenizedSplit", "build_token_cache", "load_or_build_token_cache", "LMWindows"]

IGNORE_INDEX = -100
_CACHE_FILES = ("input_ids", "target_sentence", "doc_offsets", "doc_first_sentence")


@dataclass(frozen=True)
class TokenizedSplit:
    """Flat token arrays of one split (see module doc); arrays may be memory-mapped."""

    input_ids: np.ndarray
    target_sentence: np.ndarray
    doc_offsets: np.ndarray
    doc_first_sentence: np.ndarray
    tokenizer_fingerprint: str

    @property
    def num_docs(self) -> int:
        return len(self.doc_first_sentence)

    @property
    def num_tokens(self) -> int:
        return int(self.doc_offsets[-1])

    def doc_length(self, doc: int) -> int:
        return int(self.doc_offsets[doc + 1] - self.doc_offsets[doc])


def build_token_cache(
    documents: Any,
    tokenizer: Any,
    cache_dir: str | Path,
    tokenizer_fingerprint: str,
    batch_size: int = 256,
    desc: str = "tokenize",
) -> TokenizedSplit:
    """Tokenize a split (an HF ``Dataset`` with the prepared-corpus columns) into ``cache_dir``.

    Safe when several processes (the local rank 0 of each node, or concurrent runs) build the
    same cache at once: each writes a private folder and renames it into place, so a reader sees
    either no cache or a complete one, and the first writer to finish wins.
    """
    cache_dir = Path(cache_dir)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    final_dir, cache_dir = cache_dir, Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.", dir=cache_dir.parent))
    columns = documents.select_columns(["text", "sent_start", "sent_end", "first_sentence"])
    ids_parts, target_parts, lengths, firsts = [], [], [], []
    with tqdm(total=len(documents), desc=desc, unit="doc") as progress:
        for batch in columns.iter(batch_size=batch_size):
            docs = tokenize_documents(tokenizer, batch["text"], batch["sent_start"], batch["sent_end"])
            for doc, first in zip(docs, batch["first_sentence"]):
                ids_parts.append(doc.input_ids)
                target_parts.append(doc.target_sentence.astype(np.int64) + int(first))
                lengths.append(len(doc.input_ids))
                firsts.append(int(first))
            progress.update(len(docs))
    arrays = {
        "input_ids": np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int32),
        "target_sentence": np.concatenate(target_parts) if target_parts else np.zeros(0, np.int64),
        "doc_offsets": np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64),
        "doc_first_sentence": np.asarray(firsts, dtype=np.int64),
    }
    for name, array in arrays.items():
        np.save(cache_dir / f"{name}.npy", array)
    meta = {"tokenizer_fingerprint": tokenizer_fingerprint, "docs": len(firsts),
            "tokens": int(arrays["doc_offsets"][-1])}
    (cache_dir / "cache.json").write_text(json.dumps(meta, indent=2))
    _publish(cache_dir, final_dir)
    return TokenizedSplit(**arrays, tokenizer_fingerprint=tokenizer_fingerprint)


def _publish(built: Path, final: Path) -> None:
    """Rename a finished cache folder into place; a complete one written meanwhile by another
    process is kept. Caches only ever appear whole (renamed), so a non-empty folder without
    `cache.json` is not one of ours: it is refused, never deleted."""
    if final.is_dir() and not (final / "cache.json").exists() and any(final.iterdir()):
        shutil.rmtree(built, ignore_errors=True)
        raise UserError(f"{final} holds files that are not a planner-lm token cache, so it is left alone; "
                        "move it away and run the stage again")
    try:
        os.rename(built, final)
    except OSError:  # another process published first (the folder is not empty): keep theirs
        shutil.rmtree(built, ignore_errors=True)


def load_token_cache(cache_dir: str | Path) -> TokenizedSplit | None:
    """The cache in ``cache_dir``, or None when it is missing or was interrupted."""
    cache_dir = Path(cache_dir)
    meta_path = cache_dir / "cache.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    arrays = {name: np.load(cache_dir / f"{name}.npy", mmap_mode="r") for name in _CACHE_FILES}
    return TokenizedSplit(**arrays, tokenizer_fingerprint=meta["tokenizer_fingerprint"])


def load_or_build_token_cache(
    documents: Any, tokenizer: Any, cache_root: str | Path, split: str, tokenizer_fingerprint: str
) -> TokenizedSplit:
    """Reuse ``cache_root/<fingerprint>/<split>`` when complete, else tokenize the split into it.

    The folder is keyed by the tokenizer fingerprint, so a different tokenizer never reads
    another tokenizer's ids.
    """
    cache_dir = Path(cache_root) / tokenizer_fingerprint / split
    cached = load_token_cache(cache_dir)
    if cached is not None and cached.num_docs == len(documents):
        return cached
    return build_token_cache(documents, tokenizer, cache_dir, tokenizer_fingerprint,
                             desc=f"tokenize {split}")


def check_window(window: int, stride: int | None = None) -> None:
    """Refuse window/stride settings that cannot label every token once (a `UserError` naming the option)."""
    if window < 2:
        raise UserError(f"data.window must be at least 2 tokens, got {window}")
    if stride is not None and not 1 <= stride <= window - 1:
        raise UserError(f"data.stride must be between 1 and window - 1 = {window - 1}, got {stride}")


class LMWindows(Dataset):
    """Fixed-length windows over the documents of a :class:`TokenizedSplit`.

    Each item: ``input_ids``, ``attention_mask``, ``labels`` (``-100`` on padding, BOS and
    tokens labelled by the previous window) and ``target_sentence`` (global id per position;
    padding repeats the last real one). Where each sentence's document starts comes from the
    run folder (`RunFolder.doc_first`), the one source of document starts.
    """

    def __init__(self, tokens: TokenizedSplit, window: int = 128, stride: int | None = None,
                 pad_token_id: int = 0) -> None:
        check_window(window, stride)
        stride = window - 1 if stride is None else stride
        self.tokens, self.window, self.stride, self.pad_token_id = tokens, window, stride, pad_token_id
        docs, starts = [], []
        for doc in range(tokens.num_docs):
            doc_starts = np.arange(0, max(tokens.doc_length(doc) - 1, 0), stride, dtype=np.int64)
            docs.append(np.full(len(doc_starts), doc, dtype=np.int64))
            starts.append(doc_starts)
        self._doc = np.concatenate(docs) if docs else np.zeros(0, np.int64)
        self._start = np.concatenate(starts) if starts else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self._start)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        doc, start = int(self._doc[index]), int(self._start[index])
        doc_offset = int(self.tokens.doc_offsets[doc])
        end = min(start + self.window, self.tokens.doc_length(doc))
        length = end - start
        ids = np.full(self.window, self.pad_token_id, dtype=np.int64)
        ids[:length] = self.tokens.input_ids[doc_offset + start : doc_offset + end]
        target = np.empty(self.window, dtype=np.int64)
        target[:length] = self.tokens.target_sentence[doc_offset + start : doc_offset + end]
        target[length:] = target[length - 1]
        labels = ids.copy()
        labels[length:] = IGNORE_INDEX
        # Tokens up to the previous window's last token were labelled there (or are BOS).
        first_label = 1 if start == 0 else self.window - self.stride
        labels[:first_label] = IGNORE_INDEX
        mask = np.zeros(self.window, dtype=np.int64)
        mask[:length] = 1
        return {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(labels),
            "target_sentence": torch.from_numpy(target),
        }
