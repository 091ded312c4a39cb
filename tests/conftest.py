"""Shared test set-up: offline, two threads, tiny corpora and models built in-process."""
from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator

# before any Hugging Face import: tests never touch the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


class NetworkBlocked(OSError):
    """Raised by any test that tries to reach a host other than this machine."""


_local_connect = socket.socket.connect


def _connect_locally_only(self, address):  # noqa: ANN001 - socket.connect's own signature
    host = address[0] if isinstance(address, tuple) else address
    if self.family == socket.AF_UNIX or host in ("127.0.0.1", "localhost", "::1"):
        return _local_connect(self, address)  # DDP's gloo rendezvous on loopback is fine
    raise NetworkBlocked(f"a test tried to reach {address!r}; the suite must run offline")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test runs with outbound connections refused, so a hidden download fails loudly."""
    monkeypatch.setattr(socket.socket, "connect", _connect_locally_only)

TINY_DOCS = [
    {"title": "Moon", "text": "The Moon is Earth's only natural satellite. It orbits at about 384,400 km. "
     "Its surface is covered in craters.\n\nThe Moon has no atmosphere. Tides are caused mostly by the Moon."},
    {"title": "Paris", "text": "Paris is the capital of France. It has about 2.1 million residents. "
     "Dr. Haussmann rebuilt much of the city in the 19th century."},
    {"title": "Cats", "text": "Cats are small carnivorous mammals. They are often kept as pets. "
     "A group of cats is called a clowder. Cats sleep for most of the day."},
    {"title": "Empty", "text": "   \n  "},
    {"title": "Rivers", "text": "A river is a natural stream of water. Rivers flow toward an ocean, a lake or another river."},
    {"title": "Tea", "text": "Tea is an aromatic beverage. It is prepared by pouring hot water over cured leaves. "
     "After water, it is the most widely consumed drink in the world."},
    {"title": "Volcano", "text": "A volcano is a rupture in the crust of a planet. Hot lava escapes from it. "
     "Volcanoes are common at the boundaries of tectonic plates. Some are dormant."},
    {"title": "Bread", "text": "Bread is a staple food. It is usually made from flour and water. "
     "It has been made since the Neolithic era."},
]


@pytest.fixture
def tiny_corpus_file(tmp_path):
    """A .jsonl corpus of eight short documents (one of them blank)."""
    path = tmp_path / "tiny.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in TINY_DOCS) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def tiny_prepared(tmp_path, tiny_corpus_file):
    """A finished `0_prepare` of the tiny corpus (2 val docs, 1 test doc); returns the run dir."""
    from planner_lm.corpus import CorpusConfig
    from planner_lm.pipeline.prepare import PrepareConfig, SplitConfig, prepare_corpus

    run_dir = tmp_path / "run"
    prepare_corpus(PrepareConfig(run_dir=str(run_dir), corpus=CorpusConfig(name=str(tiny_corpus_file)),
                              split=SplitConfig(val_docs=2, test_docs=1), workers=1))
    return run_dir


def build_tiny_sentence_encoder(path, hidden_size: int = 32, seed: int = 0):
    """Save a 2-layer BERT + WordPiece tokenizer as a sentence-transformers folder (no hub).

    Modules: Transformer -> mean Pooling -> Normalize, like the real MiniLM/MPNet encoders, so
    `SentenceTransformer(path)` goes through the same loading and encoding code.
    """
    from pathlib import Path

    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = Path(path)
    raw = path / "hf"
    raw.mkdir(parents=True, exist_ok=True)
    words = sorted({w.strip(".,'\"").lower() for d in TINY_DOCS for w in d["text"].split()} - {""})
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,'")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *[f"##{c}" for c in chars], *words]
    (raw / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast.from_pretrained(str(raw), do_lower_case=True)  # reads vocab.txt
    assert len(tokenizer) > len(chars), "the tiny WordPiece vocabulary did not load"
    tokenizer.save_pretrained(raw)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(dict.fromkeys(vocab)), hidden_size=hidden_size, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=2 * hidden_size, max_position_embeddings=64)
    BertModel(config).save_pretrained(raw)
    transformer = models.Transformer(str(raw), max_seq_length=48)
    encoder = SentenceTransformer(modules=[transformer, models.Pooling(hidden_size, "mean"), models.Normalize()],
                                  device="cpu")
    encoder.save(str(path / "encoder"))
    return path / "encoder"


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory):
    """A tiny sentence-transformers encoder folder (32-d, 2 layers) built in-process."""
    return build_tiny_sentence_encoder(tmp_path_factory.mktemp("tiny_encoder"))


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run a block on `count` torch threads (module-scoped fixtures cannot use `one_thread`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread: two threads thrash when the CPUs are shared."""
    with torch_threads(1):
        yield
