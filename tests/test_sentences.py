from planner_lm.sentences import sentence_of_offsets, sentence_spans

TRICKY = ("Dr. Smith went to Washington, D.C. on Jan. 5. He met Mr. Jones at 3 p.m. and left, "
          "e.g. by train.  Then it rained.\n\nHistory\n\nThe city was founded in 1790. It grew fast.")


def test_spans_split_where_a_reader_would():
    spans = sentence_spans(TRICKY)
    assert [TRICKY[a:b] for a, b in spans] == [
        "Dr. Smith went to Washington, D.C. on Jan. 5.",
        "He met Mr. Jones at 3 p.m. and left, e.g. by train.",
        "Then it rained.",
        "History",
        "The city was founded in 1790.",
        "It grew fast.",
    ]


def test_spans_lose_no_character():
    text = "  Leading space. Two  spaces.\tTab.\n\n\nNew para!  Trailing  "
    spans = sentence_spans(text)
    pieces, cursor = [], 0
    for start, end in spans:
        assert text[cursor:start].strip() == ""  # only whitespace between sentences
        assert text[start:end] == text[start:end].strip()  # trimmed
        pieces.append(text[cursor:end])
        cursor = end
    pieces.append(text[cursor:])
    assert "".join(pieces) == text
    assert text[cursor:].strip() == ""


def test_blank_text_has_no_sentence():
    assert sentence_spans(" \n\t ") == []


def test_offsets_between_sentences_belong_to_the_next_sentence():
    text = "One. Two.  Three."
    spans = sentence_spans(text)
    assert len(spans) == 3
    owner = sentence_of_offsets(spans, range(len(text)))
    assert list(owner) == [0] * 4 + [1] * 5 + [2] * 8
