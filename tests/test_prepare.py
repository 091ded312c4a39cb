import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from planner_lm.corpus import CorpusConfig
from planner_lm.errors import UserError
from planner_lm.pipeline.prepare import PrepareConfig, SplitConfig, prepare_corpus, split_documents
from planner_lm.prepared import PreparedCorpus

ROOT = Path(__file__).resolve().parents[1]


def test_splits_are_deterministic_disjoint_and_complete():
    a = split_documents(1000, SplitConfig(val_docs=0.1, test_docs=50), seed=3)
    b = split_documents(1000, SplitConfig(val_docs=0.1, test_docs=50), seed=3)
    c = split_documents(1000, SplitConfig(val_docs=0.1, test_docs=50), seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], c["test"])
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (850, 100, 50)
    union = np.concatenate(list(a.values()))
    assert len(np.unique(union)) == 1000


def test_too_small_corpus_for_the_split_is_a_user_error():
    with pytest.raises(UserError, match="too few"):
        split_documents(5, SplitConfig(val_docs=3, test_docs=2), seed=0)


def test_prepare_drops_blank_documents_and_keeps_spans_exact(tiny_prepared):
    corpus = PreparedCorpus(tiny_prepared / "0_prepare")
    facts = corpus.manifest.facts
    assert facts["dropped_empty_docs"] == 1
    assert facts["num_docs"] == 7
    assert [facts["splits"][s]["docs"] for s in ("train", "val", "test")] == [4, 2, 1]
    # global sentence ids are contiguous across splits and match the texts
    texts = corpus.sentence_texts()
    assert len(texts) == corpus.num_sentences == facts["num_sentences"]
    assert corpus.sentence_range("val")[0] == facts["splits"]["train"]["sentences"]
    first = corpus.sentence_doc_first
    for name in ("train", "val", "test"):
        table = corpus.split(name)
        for row in table:
            n = len(row["sent_start"])
            ids = range(row["first_sentence"], row["first_sentence"] + n)
            assert all(first[i] == row["first_sentence"] for i in ids)
            assert [texts[i] for i in ids] == [row["text"][a:b] for a, b in zip(row["sent_start"], row["sent_end"])]
    assert "It orbits at about 384,400 km." in texts


def test_prepare_is_byte_identical_when_repeated(tmp_path, tiny_corpus_file):
    def build(run):
        prepare_corpus(PrepareConfig(run_dir=str(run), corpus=CorpusConfig(name=str(tiny_corpus_file)),
                                  split=SplitConfig(val_docs=2, test_docs=1), workers=1))
        return {p.relative_to(run): p.read_bytes() for p in sorted((run / "0_prepare").rglob("*"))
                if p.is_file() and p.name != "manifest.json"}

    assert build(tmp_path / "a") == build(tmp_path / "b")


def test_empty_corpus_is_a_user_error(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text('{"text": "  "}\n{"text": ""}\n')
    with pytest.raises(UserError, match="no non-empty documents"):
        prepare_corpus(PrepareConfig(run_dir=str(tmp_path / "r"), corpus=CorpusConfig(name=str(path))))


def _run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "stages/prepare.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_cli_runs_from_yaml_and_overrides_and_refuses_config_changes(tmp_path, tiny_corpus_file):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"corpus:\n  name: {tiny_corpus_file}\nsplit:\n  val_docs: 1\n  test_docs: 1\nworkers: 1\n")
    run = tmp_path / "run"
    done = _run_cli("--config", str(cfg), "--run_dir", str(run), "--split.val_docs", "2")
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and "dropped empty documents: 1" in done.stdout
    assert PreparedCorpus(run / "0_prepare").manifest.facts["splits"]["val"]["docs"] == 2
    again = _run_cli("--config", str(cfg), "--run_dir", str(run))
    assert again.returncode == 2 and "different config" in again.stderr and "Traceback" not in again.stderr
    bad = _run_cli("--config", str(cfg), "--run_dir", str(run), "--split.no_such_key", "1")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr


def test_cli_names_a_non_utf8_file(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe bad bytes")
    done = _run_cli("--corpus.name", str(bad), "--run_dir", str(tmp_path / "r"))
    assert done.returncode == 2
    assert "bad.txt is not valid UTF-8" in done.stderr and "Traceback" not in done.stderr
