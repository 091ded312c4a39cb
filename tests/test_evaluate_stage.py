"""The evaluate stage end to end on fabricated upstream stages and tiny joint runs."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_stages import load_stage, make_fake_upstream, write_fake_lm, write_fake_planner
from planner_lm.run_folder import stage_dir
from planner_lm.artifacts import read_manifest, write_manifest
from planner_lm.errors import UserError
from planner_lm.pipeline.evaluate import EvaluateConfig, StructureConfig, evaluate_runs
from planner_lm.models.base_lm import load_base_lm
from planner_lm.tokenization import load_tokenizer, tokenizer_fingerprint
from planner_lm.models.conditioning import ActionConditionedLM
from planner_lm.models.planner import Planner

K, DIM = 8, 16


def hash_encoder(texts):
    rows = [torch.randn(DIM, generator=torch.Generator().manual_seed(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)))
            for t in texts]
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1) if rows else torch.zeros(0, DIM)


def write_joint_run(run_dir: Path, selection: str, tokenizer, with_planner: bool) -> None:
    out = run_dir / f"4_joint-{selection}"
    centroids = torch.from_numpy(np.load(stage_dir(run_dir, "cluster") / "centroids.npy"))
    lm = ActionConditionedLM(load_base_lm(str(stage_dir(run_dir, "pretrain_lm"))), centroids,
                             adapter_seed=len(selection))
    lm.save_pretrained(out / "lm", tokenizer=tokenizer)
    outputs = ["lm"]
    if with_planner:
        torch.manual_seed(1)
        Planner(embedding_dim=DIM, num_actions=K, context_sentences=3, ffn_dim=32).save_pretrained(out / "planner")
        outputs.append("planner")
    write_manifest(out, stage="finetune_joint", config={"selection": selection}, outputs=outputs,
                   facts={"selection": selection, "num_actions": K, "embedding_dim": DIM,
                          "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "lm_name": "tiny",
                          "base_mode": "frozen", "trained": selection != "none"})  # adapters only; `none` untouched


def fake_joint_runs(where: Path, selections: tuple[str, ...], num_docs: int = 30,
                    sentences_per_doc: tuple[int, int] = (2, 6)) -> Path:
    """A fake run (upstream stages, tiny LM, planner) with untrained joint runs of `selections`
    (the planner selections get their own planner)."""
    run = make_fake_upstream(where, num_docs=num_docs, sentences_per_doc=sentences_per_doc, dim=DIM, k=K)
    write_fake_lm(run)
    write_fake_planner(run, K, DIM, context_sentences=3)
    tokenizer = load_tokenizer("gpt2")
    for selection in selections:
        write_joint_run(run, selection, tokenizer, with_planner=selection in ("soft", "hard"))
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return fake_joint_runs(tmp_path_factory.mktemp("eval"), ("soft", "fixed", "boundary", "none"))


def config(run_dir: Path, **overrides) -> EvaluateConfig:
    structure = StructureConfig(docs=3, prompt_sentences=1, max_new_tokens=8, batch_size=3)
    settings = dict(window=16, stride=8, batch_size=8, bootstrap_samples=200, structure=structure, device="cpu")
    return EvaluateConfig(run_dir=str(run_dir), **{**settings, **overrides})


@pytest.fixture(scope="module")
def metrics(run_dir):
    """Run the real `stages/evaluate.py` entry point; the metrics as written to metrics.json."""
    import planner_lm.sentence_vectors

    args = ["--run_dir", str(run_dir), "--window", "16", "--stride", "8", "--batch_size", "8",
            "--bootstrap_samples", "200", "--device", "cpu", "--structure.docs", "3",
            "--structure.prompt_sentences", "1", "--structure.max_new_tokens", "8", "--structure.batch_size", "3"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(planner_lm.sentence_vectors, "load_sentence_encoder", lambda settings, device: hash_encoder)
        load_entry_point("evaluate")(args)
    return json.loads((stage_dir(run_dir, "evaluate") / "metrics.json").read_text())


def test_every_run_and_code_source_gets_a_row(metrics, run_dir):
    rows = {(r["run"], r["source"]): r for r in metrics["rows"]}
    sources = ("planner_soft", "planner_hard", "oracle", "fixed", "boundary", "position", "uniform", "none")
    expected = {(run, s) for run in ("soft", "fixed", "boundary") for s in sources}
    expected |= {("none", "none"), ("pretrained", "-"), ("soft", "planner_soft_other_doc")}  # the control: soft runs only
    assert set(rows) == expected
    assert rows[("soft", "planner_soft")]["matched"] and not rows[("soft", "oracle")]["matched"]
    for key, row in rows.items():
        if "ppl" in row:
            ppl = row["ppl"]
            assert ppl["low"] <= ppl["value"] <= ppl["high"]
            assert ppl["value"] == pytest.approx(math.exp(row["nll"]))
    # the plain LM behind every run is the same frozen base: identical `none` scores, Δ vs none = 0
    assert rows[("soft", "none")]["ppl"] == rows[("none", "none")]["ppl"]
    assert rows[("none", "none")]["vs_none"]["value"] == pytest.approx(0.0, abs=1e-12)
    assert rows[("fixed", "fixed")]["vs_fixed"]["value"] == pytest.approx(0.0, abs=1e-12)
    assert rows[("boundary", "boundary")]["vs_boundary"]["value"] == pytest.approx(0.0, abs=1e-12)
    assert rows[("boundary", "boundary")]["matched"] and rows[("soft", "planner_soft")]["vs_boundary"] is not None
    # actions change the scores (random adapters)
    assert rows[("soft", "oracle")]["ppl"]["value"] != rows[("soft", "none")]["ppl"]["value"]
    # planner metrics for the pretrained and the jointly tuned planner
    assert set(metrics["planner"]) == {"pretrained", "soft"}
    assert 0 <= rows[("soft", "planner_soft")]["top1"] <= rows[("soft", "planner_soft")]["top5"] <= 1


def test_structure_metrics_and_generations(metrics, run_dir):
    assert set(metrics["structure"]) == {"soft", "fixed", "boundary", "none"}
    for values in metrics["structure"].values():
        assert values["docs"] == 3 and 0 <= values["rouge2"] <= 1 and values["edit"] >= 0
    assert metrics["structure"]["none"]["follow"] is None  # nothing to follow without actions
    lines = (stage_dir(run_dir, "evaluate") / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 12 and json.loads(lines[0])["run"] == "soft"


def test_outputs_and_manifest(metrics, run_dir):
    out = stage_dir(run_dir, "evaluate")
    manifest = read_manifest(out, "evaluate")
    assert set(manifest.outputs) >= {"metrics.json", "results.md", "ppl.png", "nll_by_position.png"}
    table = (out / "results.md").read_text()
    assert "| run · code source |" in table and "| soft · planner_soft |" in table
    # one row per run with its own code source, plus the pretrained planner; the grid is in metrics.json
    main_table, rest = table.split("\nThe plan's content")
    assert main_table.count("\n| ") == 1 + 6 and "| soft · planner_soft_other_doc |" in main_table
    controls = [line for line in rest.split("\n\n")[1].splitlines() if line.startswith("| ")]
    assert controls[1:] == [line for line in controls if line.startswith("| soft: own plan vs another document's |")]
    by_length = rest.split("PPL by document length")[1]
    assert by_length.count("\n| ") == 1 + 4  # header + one row per run
    assert "Precision: 32 (fp32 figures" in table and metrics["precision_check"] is None
    assert "Δ vs boundary [95 % CI]" in table and "Setting: base LM tiny (" in table
    protocol = metrics["protocol"]
    assert protocol["stride"] == 8 and protocol["test_docs"] == 3 and protocol["precision"] == "32"
    assert protocol["num_actions"] == K and protocol["base_lm"] == "tiny"
    assert list((out / "tb").glob("events.*"))


def test_planner_and_controls_never_see_the_scored_sentence(metrics, run_dir, tmp_path, one_thread):
    """Give each test document's last sentence another action and embedding (no context holds it).

    Only the oracle reads the scored sentence: its score must move, while the planner's codes
    (which see the sentences before, never the one being written), fixed, boundary, uniform and
    none must score exactly as before.
    """
    from planner_lm.prepared import PreparedCorpus

    changed = tmp_path / "run"
    shutil.copytree(run_dir, changed, ignore=shutil.ignore_patterns("5_eval"))
    last = [row["first_sentence"] + len(row["sent_start"]) - 1
            for row in PreparedCorpus(stage_dir(changed, "prepare")).split("test")]
    actions_path, embeddings_path = changed / "2_cluster" / "actions.npy", changed / "1_embed" / "embeddings.npy"
    actions, embeddings = np.load(actions_path), np.load(embeddings_path)
    actions[last] = (actions[last] + 1) % K
    embeddings[last] = -embeddings[last]
    np.save(actions_path, actions)
    np.save(embeddings_path, embeddings)

    scores = evaluate_runs(config(changed, runs=["soft"], structure=StructureConfig(docs=0)), encoder=hash_encoder)
    after = {row["source"]: row["nll"] for row in scores["rows"] if row["run"] == "soft"}
    before = {row["source"]: row["nll"] for row in metrics["rows"] if row["run"] == "soft"}
    assert after["oracle"] != before["oracle"]
    for source in ("planner_soft", "planner_hard", "fixed", "boundary", "uniform", "none"):
        assert after[source] == before[source], source


def test_matched_code_source_is_each_runs_training_source():
    from planner_lm.evaluation.scoring import scored_sources as _sources_of

    assert _sources_of("soft", ["matched", "oracle", "none"]) == ["planner_soft", "oracle", "none"]
    assert _sources_of("straight_through", ["matched", "oracle"]) == ["planner_hard", "oracle"]
    assert _sources_of("oracle", ["matched", "oracle", "none"]) == ["oracle", "none"]


def test_a_variant_shares_its_parents_upstream_and_compares_beside_it(metrics, run_dir, monkeypatch, capsys):
    """`make variant`'s link rule, evaluate on the variant, and the side-by-side table of both."""
    import planner_lm.sentence_vectors
    from planner_lm.evaluation import compare

    variant = run_dir / "linked"
    upstream = [f"-o{run_dir}/3_planner/manifest.json", f"-o{run_dir}/lm/manifest.json"]  # fabricated: never rebuilt
    subprocess.run(["make", "--no-print-directory", "-s", *upstream, f"{variant}/.linked", f"RUN={run_dir}",
                    "VARIANT=linked", "VARIANT_LINKS=soft fixed", "STAMP=", f"PY={sys.executable}"],
                   cwd=Path(__file__).resolve().parents[1], check=True)
    assert (variant / "3_planner").resolve() == (run_dir / "3_planner").resolve()
    assert (variant / "4_joint-fixed" / "manifest.json").is_file() and not (variant / "4_joint-boundary").exists()
    monkeypatch.setattr(planner_lm.sentence_vectors, "load_sentence_encoder", lambda settings, device: hash_encoder)
    evaluate_runs(config(variant, structure=StructureConfig(docs=0)))
    capsys.readouterr()

    assert compare.main([str(run_dir), str(variant)]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert [line.split("|")[1].strip() for line in table[2:]] == [run_dir.name, "linked"], table
    parent, linked = (compare.comparison_row(d) for d in (run_dir, variant))
    assert linked["ppl"].value == pytest.approx(parent["ppl"].value)  # the same soft run, scored alike
    assert parent["vs_fixed"].low <= parent["vs_fixed"].value <= parent["vs_fixed"].high
    assert parent["top1_before"] == metrics["planner"]["pretrained"]["top1"]
    assert compare.main([str(run_dir / "missing")]) == 2
    assert "make evaluate" in capsys.readouterr().err


def test_bf16_is_checked_against_fp32_on_a_subset_and_reported(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, symlinks=True)
    metrics = evaluate_runs(config(copy, runs=["fixed"], precision="bf16", precision_check_docs=2, overwrite=True,
                                  structure=StructureConfig(docs=0)))
    check = metrics["precision_check"]
    assert (check["run"], check["source"], check["docs"]) == ("fixed", "fixed", 2)
    assert check["rel_diff"] == metrics["protocol"]["bf16_vs_fp32_ppl_rel_diff"]
    assert check["rel_diff"] == pytest.approx(check["ppl_bf16"] / check["ppl_fp32"] - 1, abs=1e-12)
    assert check["rel_diff"] != 0 and abs(check["rel_diff"]) < 0.05  # bf16 rounds, but only a little
    results = (copy / "5_eval" / "results.md").read_text()
    assert "against fp32 on a subset" in results and f"{check['rel_diff']:+.3%}" in results.split("Precision: bf16")[1]


def test_bad_requests_are_clear_errors(metrics, run_dir, tmp_path):  # metrics: a finished evaluation to differ from
    with pytest.raises(UserError, match="baselines"):
        evaluate_runs(config(run_dir, runs=["hard"]), encoder=hash_encoder)
    with pytest.raises(UserError, match="code source"):
        evaluate_runs(config(run_dir, code_sources=["planner"]), encoder=hash_encoder)
    with pytest.raises(UserError, match="run:reference"):
        evaluate_runs(config(run_dir, pairs=["soft", "soft:"]), encoder=hash_encoder)
    # a pair or code source the evaluated runs cannot give: one line, never a silently missing row
    with pytest.raises(UserError, match=r"^pair soft:pred: no evaluated run 'pred' \(evaluated: soft, boundary, fixed, "
                                        r"none\)$"):
        evaluate_runs(config(run_dir, pairs=["soft:fixed", "soft:pred"]), encoder=hash_encoder)
    with pytest.raises(UserError, match=r"^code source planner_soft_other_doc: no evaluated run takes it \(runs "
                                        r"scored with planner_soft only; evaluated: fixed\)$"):
        evaluate_runs(config(run_dir, runs=["fixed"], code_sources=["matched", "planner_soft_other_doc"]),
                      encoder=hash_encoder)
    with pytest.raises(UserError, match="different config"):
        evaluate_runs(config(run_dir, stride=4), encoder=hash_encoder)
    empty = make_fake_upstream(tmp_path, num_docs=10, dim=DIM, k=K)
    with pytest.raises(UserError, match="finetune-joint"):
        evaluate_runs(config(empty), encoder=hash_encoder)


def load_entry_point(name: str):
    """`main` of `stages/<name>.py`, the real command-line entry point."""
    return load_stage(name).main


def test_generate_stage_prints_text_with_its_plan(run_dir, monkeypatch, capsys):
    import planner_lm.pipeline.generate as stage
    import planner_lm.sentence_vectors

    main = load_entry_point("generate")
    monkeypatch.setattr(planner_lm.sentence_vectors, "load_sentence_encoder", lambda settings, device: hash_encoder)
    main(["--run_dir", str(run_dir), "--selection", "soft", "--prompt", "Sentence 1 of document 3.",
          "--plan", "3,?,5", "--max_new_tokens", "6", "--examples", "1", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert printed.startswith("Sentence 1 of document 3.") and "plan:" in printed
    assert "action    3" in printed and "(forced)" in printed and "e.g. " in printed
    generations = stage.generate_text(stage.GenerateConfig(
        run_dir=str(run_dir), selection="fixed", prompt="", max_new_tokens=4, examples=0, device="cpu",
        num_samples=2, output=str(run_dir / "gen.json")))
    assert len(generations) == 2 and all(s.source == "fixed" for g in generations for s in g.sentences)
    assert len(json.loads((run_dir / "gen.json").read_text())) == 2


def test_generate_stage_errors(run_dir, monkeypatch):
    import planner_lm.pipeline.generate as stage
    import planner_lm.sentence_vectors

    monkeypatch.setattr(planner_lm.sentence_vectors, "load_sentence_encoder", lambda settings, device: hash_encoder)
    assert stage.parse_plan("3, ?,5", K) == [3, None, 5]
    with pytest.raises(UserError, match="action id"):
        stage.parse_plan("3,99", K)
    with pytest.raises(UserError, match="finetune-joint"):
        stage.generate_text(stage.GenerateConfig(run_dir=str(run_dir), selection="hard", device="cpu"))
    with pytest.raises(UserError, match="steer"):
        stage.generate_text(stage.GenerateConfig(run_dir=str(run_dir), selection="none", plan="1", examples=0,
                                                device="cpu"))


def test_planner_codes_use_the_temperature_the_run_was_trained_with():
    from planner_lm.evaluation.scoring import code_weights
    from planner_lm.run_folder import JointRun

    logits = torch.randn(5, K)
    positions, actions = torch.arange(5), torch.zeros(5, dtype=torch.long)
    weights = code_weights("planner_soft", logits, actions, K, positions, temperature=0.5)
    torch.testing.assert_close(weights, torch.softmax(logits / 0.5, -1))

    class Trained:
        config = {"model.temperature": 0.5}

    assert JointRun("soft", Path("unused"), Trained()).planner_temperature == 0.5
    boundary = code_weights("boundary", logits, actions, K, positions)
    assert boundary.argmax(-1).tolist() == [0, 1, 0, 1, 0]


# ----------------------------------------------------------------------------- other corpora
def test_another_corpus_is_scored_with_the_runs_recipe(metrics, run_dir, tmp_path):
    """The run's own test documents, handed in as an outside corpus, score exactly as the test split
    wherever the code does not depend on the plan (fixed, none); a 300-sentence document works."""
    from planner_lm.corpus import CorpusConfig
    from planner_lm.prepared import PreparedCorpus

    test_docs = PreparedCorpus(stage_dir(run_dir, "prepare")).split("test")["text"]
    long_doc = " ".join(f"Sentence {i} of the long document." for i in range(300))
    corpus = tmp_path / "outside.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in [*test_docs, long_doc]))

    scores = evaluate_runs(config(run_dir, runs=["soft", "fixed", "none"], corpus=CorpusConfig(name=str(corpus)),
                                  structure=StructureConfig(docs=0)), encoder=hash_encoder)
    out = stage_dir(run_dir, "evaluate").with_name("5_eval-outside")
    assert read_manifest(out, "evaluate").facts["scored"].startswith("corpus ")
    assert np.load(out / "corpus" / "sentence_vectors.npy").shape == (len(test_docs) + 300 + sum(
        len(r["sent_start"]) for r in PreparedCorpus(stage_dir(run_dir, "prepare")).split("test")) - len(test_docs), DIM)
    rows = {(r["run"], r["source"]): r for r in scores["rows"]}
    before = {(r["run"], r["source"]): r for r in metrics["rows"]}
    last = scores["protocol"]["test_tokens"] - before[("fixed", "fixed")]["tokens"]
    assert last > 300 * 5  # the long document was scored whole
    # the shared documents score as before (up to float noise of other batch neighbours): compare
    # through the length buckets, which the long document does not enter
    assert rows[("fixed", "fixed")]["by_length"]["101-300"]["docs"] == 1
    for key in (("fixed", "fixed"), ("none", "none")):
        shared = {k: v for k, v in rows[key]["by_length"].items() if k != "101-300"}
        assert shared.keys() == before[key]["by_length"].keys()
        for bucket, value in shared.items():
            assert value["tokens"] == before[key]["by_length"][bucket]["tokens"]
            assert value["ppl"] == pytest.approx(before[key]["by_length"][bucket]["ppl"], rel=1e-6)
    assert "PPL by document length" in (out / "results.md").read_text()


def test_a_corpus_is_tokenized_encoded_and_planned_once_for_every_run(run_dir, tmp_path, monkeypatch):
    """Work that depends on the corpus only is done once however many runs and code sources score
    it: one tokenization, one encoder load (shared with the generations), one encoding of each
    sentence (the generations' prompt sentences once more, not once per run), one planner forward
    per planner."""
    import planner_lm.evaluation.scoring
    import planner_lm.pipeline.evaluate
    import planner_lm.sentence_vectors
    from collections import Counter

    from planner_lm.corpus import CorpusConfig

    corpus = tmp_path / "other.jsonl"
    texts = [f"Document {d} opens here. It has a middle sentence {d}. And it ends {d}." for d in range(4)]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    calls: Counter = Counter()
    encoded: Counter = Counter()

    def load_encoder(settings, device):
        calls["encoder loads"] += 1
        return lambda batch: (encoded.update(batch), hash_encoder(batch))[1]

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(planner_lm.sentence_vectors, "load_sentence_encoder", load_encoder)
    monkeypatch.setattr(planner_lm.evaluation.scoring, "load_or_build_token_cache",
                        counted("tokenizations", planner_lm.evaluation.scoring.load_or_build_token_cache))
    monkeypatch.setattr(planner_lm.pipeline.evaluate, "planner_logits",
                        counted("planner forwards", planner_lm.pipeline.evaluate.planner_logits))
    evaluate_runs(config(run_dir, runs=["soft", "fixed", "boundary"], code_sources=["matched", "oracle", "none"],
                         corpus=CorpusConfig(name=str(corpus)),
                         structure=StructureConfig(docs=2, prompt_sentences=1, max_new_tokens=4, batch_size=2)))
    assert calls == {"encoder loads": 1, "tokenizations": 1, "planner forwards": 2}  # pretrained + soft's own
    sentences = [s for t in texts for s in t.replace(". ", ".|").split("|")]
    prompts = {f"Document {d} opens here." for d in range(2)}
    assert {s: encoded[s] for s in sentences} == {s: 1 + (s in prompts) for s in sentences}


def test_corpora_the_run_cannot_read_are_refused_in_one_line(run_dir, tmp_path):
    from planner_lm.corpus import CorpusConfig

    cases = {"empty.txt": ("   \n", "no non-empty documents"),
             "russian.txt": ("Это предложение написано по-русски. " * 20, "mostly in CYRILLIC"),
             "latin1.txt": ("caf\xe9 au lait. ".encode("latin-1") * 5, "not valid UTF-8")}
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(UserError, match=message):
            evaluate_runs(config(run_dir, runs=["fixed"], corpus=CorpusConfig(name=str(path)),
                                 structure=StructureConfig(docs=0)), encoder=hash_encoder)


@pytest.mark.slow
def test_documents_sharded_over_two_processes_give_the_same_table(metrics, run_dir, tmp_path):
    """`torchrun --nproc-per-node 2 stages/evaluate.py`: each process scores every other document;
    rank 0 gathers them and writes the same rows as one process."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("5_eval*"))
    args = ["--run_dir", str(copy), "--window", "16", "--stride", "8", "--batch_size", "8", "--bootstrap_samples",
            "200", "--device", "cpu", "--structure.docs", "0"]
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           str(Path(__file__).resolve().parents[1] / "stages" / "evaluate.py"), *args],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stdout
    sharded = json.loads((stage_dir(copy, "evaluate") / "metrics.json").read_text())
    rows = {(r["run"], r["source"]): r for r in metrics["rows"] if "ppl" in r}
    for row in (r for r in sharded["rows"] if "ppl" in r):
        assert row["tokens"] == rows[(row["run"], row["source"])]["tokens"]
        assert row["nll"] == pytest.approx(rows[(row["run"], row["source"])]["nll"], rel=1e-6)


def test_other_document_partners_are_a_seeded_derangement_among_documents_of_similar_length():
    """Each document gets another's plan exactly once: never itself nor its corpus neighbour, from
    the documents nearest in sentence count; the same seed gives the same pairing."""
    from planner_lm.evaluation.planner_metrics import OTHER_DOC_BUCKET, other_document_partners

    lengths = np.random.default_rng(5).integers(1, 40, size=150)
    partners = other_document_partners(lengths, seed=0)
    docs = np.arange(len(lengths))
    assert sorted(partners.tolist()) == docs.tolist()  # a permutation: every plan used once
    assert np.all(np.abs(partners - docs) > 1)  # not itself, not the next or previous document
    gap = np.abs(lengths[partners] - lengths)  # buckets of 8-15 of 150 documents over 39 lengths: a few apart
    assert gap.max() <= 2 * 39 * OTHER_DOC_BUCKET // 150 and gap.mean() < 0.1 * np.abs(lengths - np.roll(lengths, -1)).mean()
    assert np.array_equal(partners, other_document_partners(lengths, seed=0))
    assert not np.array_equal(partners, other_document_partners(lengths, seed=1))
    assert other_document_partners([4], seed=0).tolist() == [0]  # no other document exists
    few = other_document_partners([2, 2, 2], seed=0)  # no non-neighbour exists for the middle one
    assert sorted(few.tolist()) == [0, 1, 2] and np.all(few != np.arange(3))


def test_other_document_control_feeds_the_planner_another_documents_context(run_dir):
    """The partner's sentence at the same relative position (a shorter plan stretched, a longer one
    thinned, never its last code repeated), deterministic, and other codes."""
    from planner_lm.evaluation.planner_metrics import (other_document_logits, other_document_partners,
                                                       other_document_targets, planner_logits)
    from planner_lm.evaluation.scoring import code_weights
    from planner_lm.evaluation.texts import test_split_text
    from planner_lm.run_folder import RunFolder

    # documents of 3, 1 and 2 sentences starting at ids 10, 13, 14; plans of documents 2, 0 and 1
    ids, firsts = torch.tensor([10, 11, 12, 13, 14, 15]), torch.tensor([10, 10, 10, 13, 14, 14])
    other_ids, other_firsts = other_document_targets(ids, firsts, [2, 0, 1])
    assert other_firsts.tolist() == [14, 14, 14, 10, 13, 13]
    assert other_ids.tolist() == [14, 14, 15, 10, 13, 13]  # i * m // n: 0,1,2 of 3 -> 0,0,1 of 2; 0,1 of 2 -> 0,0 of 1
    with pytest.raises(ValueError, match="2 partners for 3 documents"):
        other_document_targets(ids, firsts, [1, 0])

    folder = RunFolder(run_dir)
    text = test_split_text(folder)
    planner = Planner.from_pretrained(stage_dir(run_dir, "pretrain_planner") / "planner")
    lo, hi = folder.prepared.sentence_range("test")
    test_ids = torch.arange(lo, hi)
    doc_first = torch.from_numpy(np.asarray(folder.doc_first[lo:hi], dtype=np.int64))
    counts = torch.unique_consecutive(doc_first, return_counts=True)[1]
    partners = other_document_partners(counts.tolist(), seed=0)
    own = planner_logits(planner, text.embeddings, test_ids, doc_first)
    other = other_document_logits(planner, text.embeddings, test_ids, doc_first, partners)
    assert torch.equal(other, other_document_logits(planner, text.embeddings, test_ids, doc_first, partners))
    first_sentences = test_ids == doc_first  # no context in either document: the same (empty) input
    assert torch.equal(other[first_sentences], own[first_sentences])
    assert not torch.allclose(other[~first_sentences], own[~first_sentences])
    weights = code_weights("planner_soft_other_doc", other, torch.zeros(len(test_ids)), K, test_ids - doc_first)
    torch.testing.assert_close(weights, torch.softmax(other, -1))


def test_evaluation_records_the_pairing_and_the_paired_content_delta(metrics, run_dir):
    """metrics.json holds the other-document pairing it scored with and each soft run's own-vs-other Δ."""
    from planner_lm.evaluation.planner_metrics import other_document_partners
    from planner_lm.prepared import PreparedCorpus

    lengths = [len(row["sent_start"]) for row in PreparedCorpus(stage_dir(run_dir, "prepare")).split("test")]
    assert metrics["other_document"]["partners"] == other_document_partners(lengths, seed=0).tolist()
    (control,) = metrics["content_controls"]
    assert (control["run"], control["source"], control["control"]) == ("soft", "planner_soft",
                                                                       "planner_soft_other_doc")
    assert control["change"]["low"] <= control["change"]["value"] <= control["change"]["high"]


def test_an_edited_corpus_with_as_many_documents_is_tokenized_again(run_dir, tmp_path):
    """The outside corpus's token cache is keyed by the documents' text, not their count: an
    edited corpus is never scored with the tokens of the old one."""
    from planner_lm.corpus import CorpusConfig
    from planner_lm.evaluation.scoring import load_test_set
    from planner_lm.evaluation.texts import external_text
    from planner_lm.run_folder import RunFolder

    folder = RunFolder(run_dir)
    tokenizer = load_tokenizer(str(folder.tokenizer_dir(folder.joint_run("fixed"))))
    corpus, cache = tmp_path / "notes.txt", tmp_path / "5_eval-notes" / "corpus"
    seen = []
    for words in ("The cat sat on the mat. It purred.", "A dog ran in the park. It barked loudly."):
        corpus.write_text(words)
        text = external_text(folder, CorpusConfig(name=str(corpus)), cache, torch.device("cpu"), hash_encoder)
        test = load_test_set(text, tokenizer, tokenizer_fingerprint(tokenizer), None)
        seen.append(test.documents[0].input_ids.tolist())
        assert tokenizer.decode(seen[-1]).strip().endswith(words.split()[-1])
    assert seen[0] != seen[1]


def test_auto_precision_scores_in_bf16_exactly_where_training_would_autocast(run_dir, tmp_path, monkeypatch):
    from planner_lm import hardware

    for host, expected in (("32-true", "32"), ("bf16-mixed", "bf16")):
        monkeypatch.setenv(hardware.PRECISION_ENV, host)
        copy = tmp_path / host / "run"
        shutil.copytree(run_dir, copy, symlinks=True)
        metrics = evaluate_runs(config(copy, runs=["fixed"], precision="auto", precision_check_docs=2, overwrite=True,
                                      structure=StructureConfig(docs=0)))
        assert metrics["protocol"]["precision"] == expected  # the manifest says what was computed
        assert ("bf16_vs_fp32_ppl_rel_diff" in metrics["protocol"]) == (expected == "bf16")
