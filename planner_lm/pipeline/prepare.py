"""Stage 0 (`make prepare`): corpus -> seeded train/val/test documents with sentence spans.

Writes `<run_dir>/0_prepare/`: one Hugging Face `datasets` folder per split (documents with their
sentence character spans and the global id of their first sentence) and `manifest.json` with
counts and a sentences-per-document histogram. `planner_lm.prepared.PreparedCorpus` reads it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from planner_lm.artifacts import write_manifest
from planner_lm.ownership import start_stage
from planner_lm.corpus import CorpusConfig, Document, corpus_description, iter_documents
from planner_lm.errors import UserError
from planner_lm.prepared import SPLITS, STAGE
from planner_lm.run_folder import stage_dir
from planner_lm.sentences import split_sentences, splitter_name

HISTOGRAM_BINS = (1, 2, 3, 4, 5, 9, 17, 33, 65, 129, 257, 513)  # bin i holds counts in [b_i, b_{i+1})


@dataclass
class SplitConfig:
    """How documents are divided (by document, never by sentence).

    Args:
        val_docs: validation documents: a count (>= 1) or a fraction of the corpus (< 1).
        test_docs: test documents: a count (>= 1) or a fraction of the corpus (< 1).
        max_train_docs: keep at most this many training documents (None = all the rest).
    """

    val_docs: float = 0.05
    test_docs: float = 0.05
    max_train_docs: int | None = None


def _count(value: float, total: int, what: str) -> int:
    if value < 0:
        raise UserError(f"split.{what} must be >= 0, got {value}")
    return int(round(value * total)) if value < 1 else int(value)


def split_documents(num_docs: int, cfg: SplitConfig, seed: int) -> dict[str, np.ndarray]:
    """Seeded, disjoint document indices per split (sorted within each split)."""
    n_val, n_test = _count(cfg.val_docs, num_docs, "val_docs"), _count(cfg.test_docs, num_docs, "test_docs")
    if n_val + n_test >= num_docs:
        raise UserError(
            f"the corpus has {num_docs} non-empty documents, too few for {n_val} val + {n_test} test "
            f"documents and a training set; lower split.val_docs/test_docs or add documents"
        )
    order = np.random.default_rng(seed).permutation(num_docs)
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    if cfg.max_train_docs is not None:
        train = train[: cfg.max_train_docs]
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def _histogram(counts: np.ndarray) -> dict[str, int]:
    edges = list(HISTOGRAM_BINS) + [np.inf]
    hist = {}
    for lo, hi in zip(edges[:-1], edges[1:]):
        label = f"{lo}" if hi == lo + 1 else (f"{lo}+" if hi == np.inf else f"{lo}-{int(hi) - 1}")
        hist[label] = int(((counts >= lo) & (counts < hi)).sum())
    return hist


def _save_split(path: Path, table: pa.Table) -> None:
    """Save with a content-derived fingerprint so equal inputs give byte-identical files."""
    import datasets

    digest = hashlib.sha256()
    for batch in table.to_batches():
        for column in batch.columns:
            for buffer in column.buffers():
                if buffer is not None:
                    digest.update(buffer)
    datasets.disable_progress_bars()
    dataset = datasets.Dataset(table, fingerprint=digest.hexdigest()[:16])
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dataset.save_to_disk(str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


@dataclass
class PrepareConfig:
    """Settings of the prepare stage (documents -> splits -> sentence spans).

    Args:
        run_dir: run directory; output goes to `<run_dir>/0_prepare`.
        corpus: where documents come from.
        split: how documents are divided into train/val/test.
        seed: seed of the document split.
        workers: processes for sentence splitting (1 = in-process).
        overwrite: replace a finished run made with a different config.
    """

    run_dir: str = "runs/demo"
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    seed: int = 42
    workers: int = 2
    overwrite: bool = False


def prepare_corpus(cfg: PrepareConfig) -> dict:
    """Build `0_prepare/`; returns the manifest. Prints counts on screen."""
    out = stage_dir(cfg.run_dir, STAGE)
    config = asdict(cfg)
    started = time.perf_counter()
    # the corpus is read (and every bad file refused) before the stage folder is touched, so a bad
    # input never costs a finished 0_prepare/, even with --overwrite
    documents: list[Document] = list(
        tqdm(iter_documents(cfg.corpus), desc="reading corpus", unit="doc", leave=False)
    )
    start_stage(out, stage=STAGE, config=config, overwrite=cfg.overwrite)
    kept = [i for i, d in enumerate(documents) if d.text.strip()]
    dropped = len(documents) - len(kept)
    if not kept:
        raise UserError(
            f"the corpus {corpus_description(cfg.corpus)} has no non-empty documents "
            f"({len(documents)} read); check corpus.name / corpus.text_field"
        )
    splits = split_documents(len(kept), cfg.split, cfg.seed)
    facts: dict = {"corpus": corpus_description(cfg.corpus), "splitter": splitter_name(),
                   "dropped_empty_docs": dropped, "read_docs": len(documents), "splits": {}}
    next_sentence = 0
    for name in SPLITS:
        doc_ids = np.array([kept[i] for i in splits[name]], dtype=np.int64)
        texts = [documents[i].text for i in doc_ids]
        spans = split_sentences(texts, cfg.workers)
        per_doc = np.array([len(s) for s in spans], dtype=np.int64)
        first = next_sentence + np.concatenate([[0], np.cumsum(per_doc)[:-1]]).astype(np.int64) if len(per_doc) else per_doc
        table = pa.table({
            "doc_id": pa.array(doc_ids, pa.int64()),
            "title": pa.array([documents[i].title for i in doc_ids], pa.string()),
            "text": pa.array(texts, pa.large_string()),
            "sent_start": pa.array([[a for a, _ in s] for s in spans], pa.list_(pa.int32())),
            "sent_end": pa.array([[b for _, b in s] for s in spans], pa.list_(pa.int32())),
            "first_sentence": pa.array(first, pa.int64()),
        })
        _save_split(out / name, table)
        facts["splits"][name] = {
            "docs": int(len(doc_ids)), "sentences": int(per_doc.sum()),
            "chars": int(sum(len(t) for t in texts)), "first_sentence": int(next_sentence),
            "sentences_per_doc_histogram": _histogram(per_doc),
            "median_sentences_per_doc": float(np.median(per_doc)) if len(per_doc) else 0.0,
            "min_sentences_per_doc": int(per_doc.min()) if len(per_doc) else 0,
            "max_sentences_per_doc": int(per_doc.max()) if len(per_doc) else 0,
        }
        next_sentence += int(per_doc.sum())
    facts["num_sentences"] = next_sentence
    facts["num_docs"] = sum(s["docs"] for s in facts["splits"].values())
    seconds = time.perf_counter() - started
    manifest = write_manifest(out, stage=STAGE, config=config, outputs=list(SPLITS), facts=facts,
                              metrics={"seconds": round(seconds, 2)}, seed=cfg.seed)
    print(format_counts(facts, seconds))
    return manifest


def format_counts(facts: dict, seconds: float | None = None) -> str:
    lines = [f"prepared {facts['corpus']} with {facts['splitter']}"
             + (f" in {seconds:.1f} s" if seconds is not None else "")]
    lines.append(f"{'split':<6} {'docs':>8} {'sentences':>10} {'chars':>12} {'median sent/doc':>16}")
    for name in SPLITS:
        s = facts["splits"][name]
        lines.append(f"{name:<6} {s['docs']:>8,} {s['sentences']:>10,} {s['chars']:>12,} {s['median_sentences_per_doc']:>16.1f}")
    hist = facts["splits"]["train"]["sentences_per_doc_histogram"]
    lines.append("train sentences/doc: " + ", ".join(f"{k}: {v}" for k, v in hist.items() if v))
    lines.append(f"dropped empty documents: {facts['dropped_empty_docs']}")
    return "\n".join(lines)


def run_prepare(args: list[str] | None = None) -> dict:
    """`stages/prepare.py`: parse the command line (YAML configs + overrides) and prepare the corpus."""
    from planner_lm.cli import parse_config

    return prepare_corpus(parse_config(PrepareConfig, "Split a corpus into documents and sentences (stage 0).", args))
