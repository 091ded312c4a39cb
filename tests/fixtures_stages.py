"""Fabricated upstream stage directories (0_prepare, 1_embed, 2_cluster) for stage tests.

Built with the real artifacts API and the documented layout (docs/DEVELOPING.md), so tests of a
later stage need not run sentence splitting, the encoder or k-means. The actions follow a
planted rule, `next = (3 * previous + 1) % k` (the first sentence of each document is random),
and each embedding is its action's centroid plus noise, renormalised to unit norm: a planner
that learns anything should beat every content-free baseline by a wide margin.

Two switches turn the same corpus into probes of the method: `planted=False` draws every action
independently (nothing is predictable from the context, so a planner far above chance has seen
its target), and `action_words=True` makes each sentence the word of its action (`"red."`), so
the next sentence's action determines the next token (conditioning on the wrong sentence hurts).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from planner_lm.run_folder import stage_dir
from planner_lm.artifacts import atomic_save_npy, write_manifest

SPLITS = ("train", "val", "test")
ACTION_WORDS = ("red", "blue", "green", "black", "white", "brown", "gold", "gray")
"""One GPT-2 token each (with and without the leading space): sentence texts of `action_words`."""
ROOT = Path(__file__).resolve().parents[1]


def load_stage(name: str) -> ModuleType:
    """The module of `stages/<name>.py` (its `run` and `main`): tests call the real entry points."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def planted_next_action(action: np.ndarray | int, k: int) -> np.ndarray | int:
    """The rule the fake actions follow."""
    return (3 * action + 1) % k


def _split_counts(num_docs: int) -> dict[str, int]:
    held_out = max(1, num_docs // 10)
    if num_docs < 3:
        raise ValueError("make_fake_upstream needs at least 3 documents (train, val, test)")
    return {"train": num_docs - 2 * held_out, "val": held_out, "test": held_out}


def _sentence_texts(actions: list[int], doc_id: int, action_words: bool) -> list[str]:
    if action_words:
        return [f"{ACTION_WORDS[a]}." for a in actions]
    return [f"Sentence {i} of document {doc_id}." for i in range(len(actions))]


def _write_prepare(out: Path, doc_actions: dict[str, list[list[int]]], action_words: bool,
                   config: dict | None = None) -> None:
    import datasets

    facts: dict = {"corpus": "fake", "splitter": "fake", "splits": {}}
    next_sentence, doc_id = 0, 0
    for split in SPLITS:
        rows: dict[str, list] = {k: [] for k in ("doc_id", "title", "text", "sent_start", "sent_end", "first_sentence")}
        chars = 0
        split_first = next_sentence
        for actions in doc_actions[split]:
            sentences = _sentence_texts(actions, doc_id, action_words)
            n = len(sentences)
            starts, ends, pos = [], [], 0
            for s in sentences:
                starts.append(pos)
                ends.append(pos + len(s))
                pos += len(s) + 1
            text = " ".join(sentences)
            rows["doc_id"].append(doc_id)
            rows["title"].append(f"Doc {doc_id}")
            rows["text"].append(text)
            rows["sent_start"].append(starts)
            rows["sent_end"].append(ends)
            rows["first_sentence"].append(next_sentence)
            chars += len(text)
            next_sentence += n
            doc_id += 1
        features = datasets.Features({
            "doc_id": datasets.Value("int64"), "title": datasets.Value("string"), "text": datasets.Value("large_string"),
            "sent_start": datasets.Sequence(datasets.Value("int32")), "sent_end": datasets.Sequence(datasets.Value("int32")),
            "first_sentence": datasets.Value("int64"),
        })
        datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(out / split))
        facts["splits"][split] = {"docs": len(doc_actions[split]), "sentences": next_sentence - split_first,
                                  "chars": chars, "first_sentence": split_first}
    facts["num_sentences"] = next_sentence
    facts["num_docs"] = doc_id
    write_manifest(out, stage="prepare", config=config or {"fake": True}, outputs=list(SPLITS), facts=facts, seed=0)


def make_fake_upstream(
    tmp_path: str | Path,
    num_docs: int = 40,
    sentences_per_doc: int | tuple[int, int] = (1, 12),
    dim: int = 16,
    k: int = 8,
    seed: int = 0,
    noise: float = 0.3,
    planted: bool = True,
    action_words: bool = False,
    prepare_config: dict | None = None,
) -> Path:
    """Write `<tmp_path>/run/{0_prepare,1_embed,2_cluster}` with manifests; return the run dir.

    Args:
        num_docs: documents in total (10% val, 10% test, at least one each).
        sentences_per_doc: a fixed count, or an inclusive (min, max) range drawn per document.
        dim: embedding dimension.
        k: number of actions (centroids).
        seed: seed of lengths, actions, centroids and noise.
        noise: standard deviation of the per-coordinate noise added to each centroid.
        planted: actions follow `planted_next_action` inside a document; False: all independent.
        action_words: each sentence is its action's word from `ACTION_WORDS` (k <= 8).
        prepare_config: the config 0_prepare records (e.g. `{"corpus": {...}}` for held-out documents).
    """
    rng = np.random.default_rng(seed)
    run_dir = Path(tmp_path) / "run"
    lo, hi = (sentences_per_doc, sentences_per_doc) if isinstance(sentences_per_doc, int) else sentences_per_doc
    counts = _split_counts(num_docs)
    if action_words and k > len(ACTION_WORDS):
        raise ValueError(f"action_words needs k <= {len(ACTION_WORDS)}")
    lengths = {split: rng.integers(lo, hi + 1, size=counts[split]).tolist() for split in SPLITS}
    doc_actions: dict[str, list[list[int]]] = {split: [] for split in SPLITS}
    for split in SPLITS:
        for n in lengths[split]:
            doc = [int(rng.integers(k))]
            for _ in range(n - 1):
                doc.append(int(planted_next_action(doc[-1], k) if planted else rng.integers(k)))
            doc_actions[split].append(doc)
    _write_prepare(stage_dir(run_dir, "prepare"), doc_actions, action_words, prepare_config)
    actions = np.asarray([a for split in SPLITS for doc in doc_actions[split] for a in doc], dtype=np.int32)
    centroids = rng.standard_normal((k, dim)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    vectors = centroids[actions] + noise * rng.standard_normal((len(actions), dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)

    embed = stage_dir(run_dir, "embed")
    atomic_save_npy(embed / "embeddings.npy", vectors.astype(np.float16))
    write_manifest(embed, stage="embed", config={"fake": True}, inputs={"prepare": stage_dir(run_dir, "prepare")},
                   outputs=["embeddings.npy"], facts={"encoder": "fake", "embedding_dim": dim,
                                                      "num_sentences": len(actions), "dtype": "float16"}, seed=seed)
    cluster = stage_dir(run_dir, "cluster")
    atomic_save_npy(cluster / "centroids.npy", centroids)
    atomic_save_npy(cluster / "actions.npy", actions)
    write_manifest(cluster, stage="cluster", config={"fake": True, "k": k}, inputs={"embed": embed},
                   outputs=["centroids.npy", "actions.npy"],
                   facts={"num_actions": k, "embedding_dim": dim, "num_sentences": len(actions)}, seed=seed)
    return run_dir


def word_tokenizer(words: tuple[str, ...] = ACTION_WORDS) -> Any:
    """A fast word-level tokenizer over `words` and ".": the action-word corpus in 11 token ids.

    With it a tiny LM trains in seconds (GPT-2's 50,257-token softmax dominates a tiny model).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<eos>", "<unk>", ".", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")


def write_fake_lm(run_dir: Path, model_type: str = "gpt2", out: Path | None = None, tokenizer: Any = None) -> Path:
    """A tiny LM of one family (default: with the real GPT-2 tokenizer), as `pretrain-lm` would leave it."""
    import torch
    from transformers import AutoModelForCausalLM

    from planner_lm.models.base_lm import tiny_config
    from planner_lm.tokenization import load_tokenizer, tokenizer_fingerprint

    tokenizer = tokenizer or load_tokenizer("gpt2")
    eos = tokenizer.eos_token_id
    config = tiny_config(model_type, vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(0)
    out = out or stage_dir(run_dir, "pretrain_lm")
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_manifest(out, stage="pretrain_lm", config={"fake": True}, outputs=["config.json"],
                   facts={"model_type": model_type, "lm_name": f"tiny-{model_type}",
                          "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)})
    return out


def write_fake_planner(run_dir: Path, num_actions: int, embedding_dim: int, context_sentences: int = 4) -> Path:
    """An untrained planner recorded as built from the run's cluster stage, as `pretrain-planner` leaves it."""
    import torch

    from planner_lm.models.planner import Planner

    torch.manual_seed(0)
    planner = Planner(embedding_dim=embedding_dim, num_actions=num_actions, context_sentences=context_sentences,
                      ffn_dim=32, dropout=0.0)
    out = stage_dir(run_dir, "pretrain_planner")
    planner.save_pretrained(out / "planner")
    write_manifest(out, stage="pretrain_planner", config={"fake": True}, inputs={"cluster": stage_dir(run_dir, "cluster")},
                   outputs=["planner"], facts={"num_actions": num_actions, "embedding_dim": embedding_dim,
                                                  "context_sentences": context_sentences})
    return out


def record_training_steps(monkeypatch: Any, module_class: type) -> list[int]:
    """Record the global step of every training batch `module_class` runs from now on.

    Training is deterministic, so a run that silently ignored its checkpoint and started over
    would end with the same weights as a resumed one: only the steps it ran tell them apart.
    """
    steps: list[int] = []
    monkeypatch.setattr(module_class, "on_train_batch_start",
                        lambda self, batch, batch_idx: steps.append(int(self.global_step)), raising=False)
    return steps
