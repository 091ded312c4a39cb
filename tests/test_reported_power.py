"""The figures behind every verdict, recomputed from the saved artefacts by plain loops (issue 31):
the held-out split's documents, the per-document spread and resolvable Δ of each paired Δ, the
noise floor (a second `fixed` run that differs only in seed) and the verdicts it gates, and every
run's total steps from its initialisation.

One fabricated run (the planted action-word corpus of `test_reported_figures`, a tiny GPT-2 with a
word-level tokenizer, untrained joint runs with random adapters, manifests written as the stages
write them) goes through the REAL `stages/evaluate.py` entry point twice: on its test split and on
documents of its corpus that its prepare stage left unused. The per-document NLL and the bootstrap
are recomputed with `test_reported_figures`' plain loops; the statistics here are written out again.
Everything runs in fp32 (`--precision 32`): tolerances are those of `test_reported_figures`.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import torch_threads
from fixtures_stages import SPLITS, load_stage, make_fake_upstream, word_tokenizer, write_fake_lm, write_fake_planner
from test_evaluate_stage import hash_encoder
from test_reported_figures import (ATOL_DELTA, BOOTSTRAP, CONFIDENCE, RTOL, SEED, SOFT_TEMPERATURE, STRIDE, WINDOW,
                                   Corpus, OutsideCorpus, interval, per_document_nll, ppl_of, resamples)
from planner_lm.artifacts import write_manifest
from planner_lm.errors import UserError
from planner_lm.run_folder import stage_dir

K, DIM = 8, 16
NULL_SEED = 43
HELD_OUT_DOCS, HELD_OUT_SEED = 10, 5
Z_975, Z_80 = 1.959963984540054, 0.8416212335729143  # standard normal quantiles (tables)
STEPS = {"fixed": 4, "boundary": 4, "pred": 4, "soft": 3}  # soft: 3 of its own on pred's 4
CURVES = {"fixed": {2: 50.0, 4: 40.0}, "pred": {2: 48.0, 4: 39.0}, "soft": {1: 30.0, 3: 29.0}}

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- the fixture
def unused_documents() -> list[list[str]]:
    """Documents of the corpus that no split holds: one-word sentences of the action words (without
    "black", after which the sentence splitter does not break)."""
    words = ("red", "blue", "green", "white", "brown", "gold", "gray")
    rng = np.random.default_rng(11)
    return [[f"{words[int(w)]}." for w in rng.integers(0, len(words), int(n))] for n in rng.integers(2, 9, 16)]


def write_corpus(run: Path, path: Path) -> list[list[str]]:
    """The file 0_prepare records as its corpus: every split's document at its `doc_id`, then the
    unused documents, a copy of a training document's text and an empty document."""
    import datasets

    used = {row["doc_id"]: row["text"] for split in SPLITS
            for row in datasets.load_from_disk(str(stage_dir(run, "prepare") / split))}
    unused = unused_documents()
    texts = [used[i] for i in range(len(used))] + [" ".join(doc) for doc in unused] + [used[3], "  "]
    path.write_text("".join(json.dumps({"title": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return unused


def write_joint(run: Path, selection: str, tokenizer, adapter_seed: int, seed: int = 42,
                init_from: str | None = None, record_total: bool = True) -> None:
    """A finished joint run as `finetune-joint` leaves it: conditioned LM, manifest (config, inputs,
    steps, `init_from`, `total_steps` unless `record_total` is off, as in runs saved before it) and curve."""
    from planner_lm.models.base_lm import load_base_lm
    from planner_lm.models.conditioning import ActionConditionedLM
    from planner_lm.tokenization import tokenizer_fingerprint

    out = stage_dir(run, "finetune_joint", selection)
    centroids = torch.from_numpy(np.load(stage_dir(run, "cluster") / "centroids.npy"))
    lm = ActionConditionedLM(load_base_lm(str(stage_dir(run, "pretrain_lm"))), centroids, adapter_seed=adapter_seed)
    with torch.no_grad():  # adapters 3x their init: conditioning moves the scores well beyond float noise
        for adapter in lm.adapters:
            adapter.weight.mul_(3.0)
    lm.save_pretrained(out / "lm", tokenizer=tokenizer)
    outputs = ["lm"]
    if selection in CURVES:
        (out / "val_curve.json").write_text(json.dumps([{"step": s, "val/ppl": p} for s, p in CURVES[selection].items()]))
        outputs.append("val_curve.json")
    config = {"seed_everything": seed, "run_dir": str(run), "data.run_dir": str(run), "data.init_from": init_from,
              "model.selection": selection, "model.lr": 1e-3, "trainer.max_steps": STEPS[selection],
              "model.codebook_path": str(stage_dir(run, "cluster") / "centroids.npy"),
              **({"model.temperature": SOFT_TEMPERATURE} if selection == "soft" else {})}
    own = STEPS[selection]
    total = own + (STEPS[init_from] if init_from else 0)
    inputs = {name: stage_dir(run, name) for name in ("prepare", "embed", "cluster")}
    write_manifest(out, stage="finetune_joint", config=config, outputs=outputs, seed=seed,
                   inputs={**inputs, "planner": stage_dir(run, "pretrain_planner"),
                           **({"init": stage_dir(run, "finetune_joint", init_from)} if init_from else {})},
                   facts={"selection": selection, "num_actions": K, "embedding_dim": DIM, "base_mode": "frozen",
                          "trained": True, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                          "lm_name": "tiny", "init_from": init_from,
                          **({"total_steps": total} if record_total else {})},
                   metrics={"steps": own, "val/ppl": 40.0})


def link_seed_dir(run: Path, seed: int) -> Path:
    """`<run>/seed-<seed>` with the parent's upstream stages linked, as the Makefile's null rule makes it."""
    seeded = run / f"seed-{seed}"
    seeded.mkdir()
    for name in ("0_prepare", "1_embed", "2_cluster", "3_planner", "lm"):
        os.symlink(f"../{name}", seeded / name)
    return seeded


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Upstream with a recorded corpus file, joint runs fixed / boundary / pred / soft (warm from
    pred, saved without the `total_steps` fact), and fixed again with seed 43 in `seed-43/`."""
    root = tmp_path_factory.mktemp("power")
    corpus = {"name": str(root / "corpus.jsonl"), "hub_config": None, "hub_split": "train", "text_field": "text",
              "title_field": "title", "max_docs": None, "sample_seed": 0}
    run = make_fake_upstream(root, num_docs=100, sentences_per_doc=(1, 10), dim=DIM, k=K, action_words=True,
                             prepare_config={"corpus": corpus})
    write_corpus(run, root / "corpus.jsonl")
    tokenizer = word_tokenizer()
    write_fake_lm(run, tokenizer=tokenizer)
    write_fake_planner(run, K, DIM, context_sentences=3)
    for adapter_seed, selection in enumerate(("fixed", "boundary", "pred"), start=3):
        write_joint(run, selection, tokenizer, adapter_seed)
    write_joint(run, "soft", tokenizer, 7, init_from="pred", record_total=False)
    write_joint(link_seed_dir(run, NULL_SEED), "fixed", tokenizer, 9, seed=NULL_SEED)
    return run


def evaluate(run: Path, *extra: str) -> None:
    import planner_lm.sentence_vectors

    args = ["--run_dir", str(run), "--window", str(WINDOW), "--stride", str(STRIDE), "--batch_size", "8",
            "--bootstrap_samples", str(BOOTSTRAP), "--seed", str(SEED), "--device", "cpu", "--precision", "32",
            "--structure.docs", "0", "--code_sources", "[matched]", "--pairs", "[soft:pred]",
            "--null_seed", str(NULL_SEED), *extra]
    with pytest.MonkeyPatch.context() as patch, torch_threads(1):
        patch.setattr(planner_lm.sentence_vectors, "load_sentence_encoder", lambda settings, device: hash_encoder)
        load_stage("evaluate").main(args)


@pytest.fixture(scope="module")
def test_split(run) -> tuple[dict, Corpus]:
    evaluate(run)
    return json.loads((stage_dir(run, "evaluate") / "metrics.json").read_text()), Corpus(run, "test")


@pytest.fixture(scope="module")
def held_out(run) -> tuple[dict, OutsideCorpus]:
    """Evaluated on `held_out`; the documents expected, chosen here as documented: the corpus's
    documents whose index no split holds, non-empty and not a copy of a split's text, then the
    sorted positions `default_rng(seed).choice(len, count, replace=False)`."""
    evaluate(run, "--corpus.name", "held_out", "--corpus.max_docs", str(HELD_OUT_DOCS),
             "--corpus.sample_seed", str(HELD_OUT_SEED))
    candidates = unused_documents()  # the copy and the empty document are not candidates
    picks = sorted(np.random.default_rng(HELD_OUT_SEED).choice(len(candidates), HELD_OUT_DOCS, replace=False))
    return (json.loads((run / "5_eval-held_out" / "metrics.json").read_text()),
            OutsideCorpus(run, [candidates[i] for i in picks]))


# ----------------------------------------------------------------------------- plain recomputation
def scores(run: Path, corpus) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-document NLL sums and token counts of every run with its own codes, and of the null run."""
    with torch_threads(1):
        own = {"fixed": "fixed", "boundary": "boundary", "pred": "planner_soft", "soft": "planner_soft"}
        out = {name: per_document_nll(run, name, source, corpus) for name, source in own.items()}
        out["null"] = per_document_nll(run / f"seed-{NULL_SEED}", "fixed", "fixed", corpus)
    return out


def spread_of(sums, ref_sums, counts) -> dict[str, float]:
    """SE of the paired Δ by the delta method, written as loops; SD = SE·√n; MDE = (z.975 + z.8)·SE."""
    n = len(sums)
    diff_total, tokens = 0.0, 0
    for d in range(n):
        diff_total += sums[d] - ref_sums[d]
        tokens += counts[d]
    rate = diff_total / tokens
    squares = 0.0
    for d in range(n):
        squares += (sums[d] - ref_sums[d] - rate * counts[d]) ** 2
    se = math.exp(rate) * math.sqrt(n / (n - 1) * squares) / tokens
    mde = (Z_975 + Z_80) * se
    return {"se": se, "spread": se * math.sqrt(n), "mde": mde, "docs_for_target": math.ceil(n * (mde / 0.005) ** 2)}


def paired(sums, ref_sums, counts) -> dict[str, float]:
    picks = resamples(len(sums))
    return interval(ppl_of(sums, counts) / ppl_of(ref_sums, counts) - 1,
                    [ppl_of(sums, counts, p) / ppl_of(ref_sums, counts, p) - 1 for p in picks])


def verdict_of(change: dict, floor: float, better: str, worse: str) -> str:
    if change["low"] <= 0 <= change["high"]:
        return "unresolved (CI includes 0)"
    if abs(change["value"]) <= floor:
        return "within training noise"
    return better if change["value"] < 0 else worse


def check_report(report: dict, scored: dict) -> None:
    """Every comparison of the report against its recomputation: Δ and CI, spread, resolvable Δ,
    documents for ±0.5 %, total steps and verdict; the noise floor first."""
    counts = scored["fixed"][1]
    null = paired(scored["null"][0], scored["fixed"][0], counts)
    assert report["null"]["label"] == f"fixed (seed {NULL_SEED}) vs fixed" and report["null"]["seed"] == NULL_SEED
    for bound in ("value", "low", "high"):
        assert report["null"]["change"][bound] == pytest.approx(null[bound], abs=ATOL_DELTA), bound
    assert report["noise_floor"] == pytest.approx(abs(null["value"]), abs=ATOL_DELTA)
    assert abs(null["value"]) > 10 * ATOL_DELTA  # the fixture's effect: the two seeds land apart
    expected = {"soft vs fixed": ("soft", "fixed", "helps", "hurts"), "pred vs fixed": ("pred", "fixed", "helps", "hurts"),
                "boundary vs fixed": ("boundary", "fixed", "helps", "hurts"), "soft vs pred": ("soft", "pred", "better", "worse")}
    total = {"fixed": 4, "boundary": 4, "pred": 4, "soft": 7}  # soft: its 3 steps on pred's 4
    assert [c["label"] for c in report["comparisons"]] == list(expected)
    for comparison in [report["null"], *report["comparisons"]]:
        first, second, better, worse = expected.get(comparison["label"], ("null", "fixed", "", ""))
        (sums, _), (ref_sums, _) = scored[first], scored[second]
        change = paired(sums, ref_sums, counts)
        for bound in ("value", "low", "high"):
            assert comparison["change"][bound] == pytest.approx(change[bound], abs=ATOL_DELTA), (comparison["label"], bound)
        figures = spread_of(sums, ref_sums, counts)
        for key in ("se", "spread", "mde"):
            assert comparison[key] == pytest.approx(figures[key], rel=1e-4), (comparison["label"], key)
        assert abs(comparison["docs_for_target"] - figures["docs_for_target"]) <= 1, comparison["label"]
        assert comparison["total_steps"] == [total.get(first, 4), total[second]], comparison["label"]
        if comparison is not report["null"]:
            assert comparison["verdict"] == verdict_of(comparison["change"], abs(null["value"]), better, worse)
        # the delta method agrees with the bootstrap's spread of the same Δ (a check of the formula)
        picks = resamples(len(sums))
        boot = [ppl_of(sums, counts, p) / ppl_of(ref_sums, counts, p) - 1 for p in picks]
        assert figures["se"] == pytest.approx(float(np.std(boot)), rel=0.35), comparison["label"]


# ----------------------------------------------------------------------------- the figures
def test_spread_resolvable_delta_noise_floor_and_verdicts_on_the_test_split(run, test_split):
    """metrics.json `power`: the noise floor (seed 43's fixed against fixed) and, for every run
    against fixed and the soft:pred pair, the paired Δ with its CI, SE, per-document SD, resolvable
    Δ at 80 % power, documents needed for ±0.5 %, total steps and verdict."""
    metrics, corpus = test_split
    report = metrics["power"]
    assert report["docs"] == len(corpus.docs) == metrics["protocol"]["test_docs"]
    assert report["z"] == pytest.approx(Z_975 + Z_80, abs=1e-9) and report["target"] == 0.005
    check_report(report, scores(run, corpus))


def test_results_md_prints_the_noise_floor_and_each_verdicts_figures(run, test_split):
    metrics, _ = test_split
    results = (stage_dir(run, "evaluate") / "results.md").read_text()
    floor = metrics["power"]["null"]["change"]
    assert f"lands at {floor['value']:+.2%} [{floor['low']:+.2%}, {floor['high']:+.2%}] from `fixed`" in results
    for c in metrics["power"]["comparisons"]:
        change = c["change"]
        assert (f"| {c['label']} | " + " vs ".join(f"{s:,}" for s in c["total_steps"])) in results
        assert (f"{change['value']:+.2%} [{change['low']:+.2%}, {change['high']:+.2%}] | {c['spread']:.2%} | "
                f"{c['mde']:.2%} | {c['docs_for_target']:,} | {c['verdict']} |") in results
    assert "| soft vs fixed | 7 vs 4 (unequal) |" in results


def test_held_out_documents_are_the_unused_ones_and_carry_the_same_figures(run, held_out):
    """`--corpus.name held_out`: the corpus's documents no split holds (not its copy of a training
    document, not its empty one), a seeded choice of `max_docs`; scored there, each run's PPL, the
    noise floor, spreads and verdicts follow from those documents."""
    metrics, corpus = held_out
    assert metrics["protocol"]["test_docs"] == HELD_OUT_DOCS
    assert metrics["protocol"]["scored"].startswith("corpus held_out: 10 (seed 5) of the run's unused documents")
    scored = scores(run, corpus)
    rows = {row["run"]: row for row in metrics["rows"] if row.get("matched")}
    for name in ("fixed", "boundary", "pred", "soft"):
        sums, counts = scored[name]
        assert rows[name]["tokens"] == int(counts.sum())
        assert rows[name]["ppl"]["value"] == pytest.approx(ppl_of(sums, counts), rel=RTOL), name
    check_report(metrics["power"], scored)


def test_total_steps_count_from_each_runs_initialisation(run, test_split):
    """The setting line, `protocol.total_steps` and the learning-curve table count a warm start's
    steps on top of its source's (soft: 3 on pred's 4 = 7; its curve's steps 1, 3 are totals 5, 7)."""
    metrics, _ = test_split
    assert metrics["protocol"]["total_steps"] == {"fixed": 4, "boundary": 4, "pred": 4, "soft": 7}
    results = (stage_dir(run, "evaluate") / "results.md").read_text()
    assert "(frozen base weights, 4 (soft 7 = 3 on pred's 4) joint steps from initialisation)" in results
    assert metrics["val_curves"]["soft"] == {"5": 30.0, "7": 29.0}
    assert metrics["val_curves"]["fixed"] == {"2": 50.0, "4": 40.0}
    rows = {line.split(" | ")[0]: line for line in results.splitlines() if line.startswith("| ")}
    assert f"{39.0:.2f} ({39.0 / 40.0 - 1:+.2%})" in rows["| 4"]  # pred against fixed after 4 steps each
    assert "29.00 |" in rows["| 7"] and "(" not in rows["| 7"]  # soft after 7: no fixed at that budget
    assert "| total step |" in results


def test_the_null_run_must_differ_only_in_its_seed(run, tmp_path):
    """A second fixed run trained with another learning rate (or none at all) is no noise floor."""
    from planner_lm.evaluation.power import null_fixed_run, seed_only_differences
    from planner_lm.run_folder import RunFolder

    folder = RunFolder(run)
    runs, fixed = folder.joint_runs(["fixed", "soft"]), folder.joint_run("fixed")
    null = null_fixed_run(folder, runs, NULL_SEED)
    assert null.dir == run / f"seed-{NULL_SEED}" / "4_joint-fixed"
    assert seed_only_differences(fixed.manifest, null.manifest) == []
    other = folder.joint_run("boundary").manifest  # another selection (and adapters)
    assert seed_only_differences(fixed.manifest, other) == ["model.selection"]
    with pytest.raises(UserError, match="seed-44.*not a finished run"):
        null_fixed_run(folder, runs, 44)
    with pytest.raises(UserError, match="evaluate this run's fixed run too"):
        null_fixed_run(folder, folder.joint_runs(["soft"]), NULL_SEED)


def test_verdict_needs_a_ci_excluding_zero_and_a_delta_above_the_noise_floor():
    from planner_lm.evaluation.bootstrap import Interval
    from planner_lm.evaluation.power import verdict

    assert verdict(Interval(-0.02, -0.03, -0.01), 0.005) == "helps"
    assert verdict(Interval(-0.02, -0.03, -0.01), 0.025) == "within training noise"
    assert verdict(Interval(-0.02, -0.05, 0.01), 0.0) == "unresolved (CI includes 0)"
    assert verdict(Interval(0.02, 0.01, 0.03), 0.005, "better", "worse") == "worse"
    assert verdict(Interval(-0.02, -0.03, -0.01), None) == "helps (no noise floor measured)"


def test_held_out_is_an_evaluation_corpus_only(tmp_path):
    from planner_lm.corpus import CorpusConfig, iter_documents

    with pytest.raises(UserError, match="only `evaluate` reads it"):
        list(iter_documents(CorpusConfig(name="held_out")))
