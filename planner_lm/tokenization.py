"""Document text + sentence character spans -> LM token ids aligned with sentence ids.

Each document is tokenized ONCE as a whole (nothing is glued back together, so no whitespace is
lost between sentences, a flaw of the authors' data) and every token is mapped to the sentence
it belongs to through the fast tokenizer's character offsets. Whitespace between two sentences
belongs to the *following* sentence (GPT-2 tokens carry their leading space: " He").

Alignment (the paper's shift): position ``t`` predicts token ``t+1``, so position ``t`` is
conditioned on the plan of the sentence that token ``t+1`` belongs to: its *target sentence*.
The BOS position therefore targets sentence 0, and the last token of a sentence targets the next
sentence. The final token of a document (which predicts nothing) keeps its own sentence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = [
    "TokenizedDocument",
    "bos_token_id",
    "tokenize_documents",
    "token_sentence_index",
    "target_sentence_index",
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
