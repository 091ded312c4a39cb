"""The one sentence splitter: character spans of the original text.

nupunkt (Punkt with a pretrained English model, pure Python, no data download) was chosen for
being fast (~4 MB/s here) and right on abbreviations such as "D.C.", "e.g." and "p.m.";
blank lines always end a sentence (headings, list items). Every consumer — the prepare stage,
the LM token alignment, evaluation of other corpora and generation-time re-planning — uses this
module, so there is exactly one notion of where a sentence ends.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from multiprocessing import get_context

import numpy as np

import nupunkt
from tqdm.auto import tqdm

_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n\s*")
_NON_SPACE = re.compile(r"\S")


@lru_cache(maxsize=1)
def splitter_name() -> str:
    return f"nupunkt-{nupunkt.__version__}"


def _trim(text: str, start: int, end: int) -> tuple[int, int] | None:
    """Shrink [start, end) to its non-whitespace core, or None if it is blank."""
    match = _NON_SPACE.search(text, start, end)
    if match is None:
        return None
    start = match.start()
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Sentences of `text` as (start, end) character offsets, trimmed of surrounding whitespace.

    Consecutive spans are separated by whitespace only, so no character of the text is lost:
    `text[end_i:start_{i+1}].isspace()` holds for every pair and everything outside the spans is
    whitespace.
    """
    spans: list[tuple[int, int]] = []
    for start, end in nupunkt.sent_spans(text):
        # a blank line inside a Punkt sentence is a boundary Punkt cannot see (headings, lists)
        piece_start = start
        for blank in _BLANK_LINE.finditer(text, start, end):
            trimmed = _trim(text, piece_start, blank.start())
            if trimmed:
                spans.append(trimmed)
            piece_start = blank.end()
        trimmed = _trim(text, piece_start, end)
        if trimmed:
            spans.append(trimmed)
    return spans


def sentence_of_offsets(spans: Sequence[tuple[int, int]], offsets: Sequence[int] | np.ndarray) -> np.ndarray:
    """The sentence each character offset belongs to (vectorised).

    Whitespace between two sentences belongs to the following sentence, so a GPT-2 token " He"
    that starts with the inter-sentence space is part of the sentence it opens; leading
    whitespace belongs to the first sentence and trailing whitespace to the last.
    """
    if len(spans) == 0:
        raise ValueError("a document without sentences has no sentence offsets")
    # sentence i (i >= 1) owns [end of sentence i-1, end of sentence i)
    boundaries = np.array([0] + [end for _start, end in spans[:-1]], dtype=np.int64)
    owner = np.searchsorted(boundaries, np.asarray(offsets, dtype=np.int64), side="right") - 1
    return np.clip(owner, 0, len(spans) - 1)


PROBE = " The"
"""What the splitter sees after the open sentence when deciding whether it is complete."""


def is_sentence_complete(open_text: str) -> bool:
    """Does ``open_text`` (the open sentence, maybe unfinished) end a sentence?"""
    stripped = open_text.rstrip()
    if not stripped:
        return False
    spans = sentence_spans(open_text + PROBE)
    return len(spans) > 1 and spans[0][1] == len(stripped)


def _spans_of(texts: Sequence[str]) -> list[list[tuple[int, int]]]:
    return [sentence_spans(t) for t in texts]


def split_sentences(texts: Sequence[str], workers: int) -> list[list[tuple[int, int]]]:
    """Sentence spans for every text, in parallel chunks when the corpus is large."""
    chunk = 5000
    chunks = [texts[i:i + chunk] for i in range(0, len(texts), chunk)]
    bar = tqdm(total=len(texts), desc="splitting sentences", unit="doc", leave=False)
    out: list[list[tuple[int, int]]] = []
    if workers > 1 and len(chunks) > 2:
        # fork: nothing heavy is loaded yet, and it works from any entry point (stdin included)
        with get_context("fork").Pool(workers) as pool:
            for spans in pool.imap(_spans_of, chunks):
                out.extend(spans)
                bar.update(len(spans))
    else:
        for part in chunks:
            out.extend(_spans_of(part))
            bar.update(len(part))
    bar.close()
    return out
