"""Every figure the project reports, recomputed here from the saved artefacts by plain loops.

One fabricated run (planted action-word corpus, word-level tokenizer, a tiny GPT-2, the REAL
`pretrain-planner` stage for a few epochs, untrained joint runs with random adapters) goes
through the REAL `stages/evaluate.py` entry point once. Each test then recomputes a reported
number from the files on disk — the prepared documents, `embeddings.npy`, `actions.npy`,
`centroids.npy`, the saved LMs and planners — with loops written out below. The only library
code they share with the implementation is the two models' forward passes
(`ActionConditionedLM.forward`, `Planner.forward`) and the loaders of their saved weights.

Precision: every stage runs in fp32 here (`--trainer.precision 32-true` for the planner stage,
`--precision 32` for evaluate), so both sides compute the same fp32 forward passes and differ
only by summation order and batch padding: relative 1e-5 on perplexities and log-likelihoods
(about 10x the fp32 noise seen on these sums), absolute 1e-5 on paired relative changes,
exact for counts and accuracies. Each test also asserts that the fixture moves its figure by
more than 10x its tolerance, so a test that passes is not passing because nothing differs.
"""
from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import torch_threads
from fixtures_stages import ACTION_WORDS, load_stage, make_fake_upstream, word_tokenizer, write_fake_lm
from test_evaluate_stage import hash_encoder
from planner_lm.artifacts import write_manifest
from planner_lm.run_folder import stage_dir

K, DIM = 8, 16
WINDOW, STRIDE = 12, 5
BOOTSTRAP, SEED, CONFIDENCE = 300, 0, 0.95
SOFT_TEMPERATURE = 0.5
STRUCTURE_DOCS, PROMPT_SENTENCES = 8, 1
RTOL = 1e-5  # fp32 sums of a few hundred token log-probabilities
ATOL_DELTA = 1e-5  # paired relative PPL changes
ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("planner_soft", "planner_hard", "oracle", "fixed", "boundary", "position", "uniform", "none")
POSITION_CAP = min(15, K - 1)  # the position control: sentence index, capped at 15 and at K - 1 (documented)
BF16_RTOL = 5e-4  # bf16 figures against fp32: 0.05 %, tighter than the smallest reported Δ (0.08 %)
PRECISION_CHECK_DOCS = 4

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- the fixture
def _write_joint_run(run: Path, selection: str, tokenizer, planner: bool, seed: int) -> None:
    from planner_lm.models.base_lm import load_base_lm
    from planner_lm.models.conditioning import ActionConditionedLM
    from planner_lm.models.planner import Planner
    from planner_lm.tokenization import tokenizer_fingerprint

    out = run / f"4_joint-{selection}"
    centroids = torch.from_numpy(np.load(stage_dir(run, "cluster") / "centroids.npy"))
    lm = ActionConditionedLM(load_base_lm(str(stage_dir(run, "pretrain_lm"))), centroids, adapter_seed=seed)
    with torch.no_grad():  # adapters 3x their init: conditioning moves the scores well beyond float noise
        for adapter in lm.adapters:
            adapter.weight.mul_(3.0)
    lm.save_pretrained(out / "lm", tokenizer=tokenizer)
    outputs = ["lm"]
    if planner:
        torch.manual_seed(seed)
        Planner(embedding_dim=DIM, num_actions=K, context_sentences=3, ffn_dim=32, dropout=0.0).save_pretrained(
            out / "planner")
        outputs.append("planner")
    config = {"selection": selection, **({"model.temperature": SOFT_TEMPERATURE} if selection == "soft" else {})}
    write_manifest(out, stage="finetune_joint", config=config, outputs=outputs,
                   facts={"selection": selection, "num_actions": K, "embedding_dim": DIM, "base_mode": "frozen",
                          "trained": selection != "none", "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                          "lm_name": "tiny"})


def _never_ends(lm_dir: Path, eos: int) -> None:
    """Push the tiny LM's end-of-text logit to about -16, so generations run their full length.

    Logits are `ln_f(h) @ wte.T`; with `ln_f.bias = 1` and `wte[eos] = -0.5` everywhere the EOS
    logit is `-0.5 * 32` whatever the hidden state (a layer-normed vector sums to zero)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(lm_dir)
    with torch.no_grad():
        model.transformer.ln_f.bias.fill_(1.0)
        model.transformer.wte.weight[eos] = -0.5
    model.save_pretrained(lm_dir)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Upstream stages, the real planner stage (fp32), joint runs soft / fixed / boundary / position / none."""
    run = make_fake_upstream(tmp_path_factory.mktemp("figures"), num_docs=100, sentences_per_doc=(1, 12), dim=DIM,
                             k=K, action_words=True)
    tokenizer = word_tokenizer()
    _never_ends(write_fake_lm(run, tokenizer=tokenizer), tokenizer.eos_token_id)
    with torch_threads(1):
        load_stage("pretrain_planner").run([
            "--config", str(ROOT / "configs" / "pretrain_planner.yaml"), "--run_dir", str(run),
            "--trainer.precision", "32-true", "--trainer.max_epochs", "6", "--trainer.val_check_interval", "1.0",
            "--model.ffn_dim", "32", "--model.dropout", "0.0", "--model.lr", "1e-2", "--data.batch_size", "32",
            "--data.context_sentences", "4", "--data.num_workers", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.log_every_n_steps", "5"])
    for seed, (selection, planner) in enumerate((("soft", True), ("fixed", False), ("boundary", False),
                                                 ("none", False), ("position", False)), start=3):
        _write_joint_run(run, selection, tokenizer, planner, seed)
    return run


def _evaluate(run: Path, *extra: str, pairs: str = "[soft:boundary, fixed:none, soft:position]") -> None:
    import planner_lm.sentence_vectors

    args = ["--run_dir", str(run), "--window", str(WINDOW), "--stride", str(STRIDE), "--batch_size", "8",
            "--bootstrap_samples", str(BOOTSTRAP), "--seed", str(SEED), "--device", "cpu", "--precision", "32",
            "--structure.docs", str(STRUCTURE_DOCS), "--structure.prompt_sentences", str(PROMPT_SENTENCES),
            "--structure.max_new_tokens", "40", "--structure.batch_size", "4",
            "--pairs", pairs, *extra]
    with pytest.MonkeyPatch.context() as patch, torch_threads(1):
        patch.setattr(planner_lm.sentence_vectors, "load_sentence_encoder", lambda settings, device: hash_encoder)
        load_stage("evaluate").main(args)


@pytest.fixture(scope="module")
def metrics(run) -> dict:
    """The real evaluate entry point, fp32; metrics.json as written."""
    _evaluate(run)
    return json.loads((stage_dir(run, "evaluate") / "metrics.json").read_text())


@pytest.fixture(scope="module")
def bf16(run, metrics, tmp_path_factory) -> dict:
    """The real evaluate entry point on a copy of the run, scored with bf16 autocast (CPU)."""
    import shutil

    copy = tmp_path_factory.mktemp("bf16") / "run"
    shutil.copytree(run, copy, symlinks=True, ignore=shutil.ignore_patterns("5_eval*"))
    _evaluate(copy, "--precision", "bf16", "--precision_check_docs", str(PRECISION_CHECK_DOCS), "--runs",
              "[soft, fixed]", "--structure.docs", "0", pairs="[soft:fixed]")
    return json.loads((stage_dir(copy, "evaluate") / "metrics.json").read_text())


@pytest.fixture(scope="module")
def rows(metrics) -> dict:
    return {(r["run"], r["source"]): r for r in metrics["rows"]}


# ----------------------------------------------------------------------------- plain recomputation
class Corpus:
    """The split's documents as saved by prepare, with actions and embeddings by global sentence id."""

    def __init__(self, run: Path, split: str) -> None:
        import datasets

        self.docs = list(datasets.load_from_disk(str(stage_dir(run, "prepare") / split)))
        self.actions = np.load(stage_dir(run, "cluster") / "actions.npy").astype(np.int64)
        self.embeddings = np.load(stage_dir(run, "embed") / "embeddings.npy").astype(np.float32)

    def sentences(self):
        """(global id, first id of its document, index in its document) of every sentence."""
        for doc in self.docs:
            for i in range(len(doc["sent_start"])):
                yield doc["first_sentence"] + i, doc["first_sentence"], i


def tokens_of(tokenizer, text: str, ends: list[int]) -> tuple[list[int], list[int]]:
    """Token ids (BOS first) and, per position, the document-local sentence of the NEXT token.

    A token belongs to the sentence whose [end of the previous sentence, own end) holds its first
    character; the last position keeps its own token's sentence (it predicts nothing).
    """
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    owner = []
    for start, _ in encoded["offset_mapping"]:
        i = 0
        while i < len(ends) - 1 and start >= ends[i]:
            i += 1
        owner.append(i)
    ids = [bos, *encoded["input_ids"]]
    next_sentence = [*owner, owner[-1]]  # position t -> sentence of token t + 1
    return ids, next_sentence


@torch.no_grad()
def planner_logits_of(planner, vectors: np.ndarray, j: int, first: int) -> torch.Tensor:
    """Logits for sentence `j` from the true previous sentences `max(first, j - S) .. j - 1`,
    right-aligned in S slots (the last slot = the sentence right before `j`), others masked."""
    slots = planner.context_sentences
    context = torch.zeros(1, slots, vectors.shape[1])
    mask = torch.zeros(1, slots, dtype=torch.bool)
    for s in range(slots):
        sentence = j - slots + s
        if sentence >= first:
            context[0, s] = torch.from_numpy(np.asarray(vectors[sentence], dtype=np.float32))
            mask[0, s] = True
    return planner.eval()(context, mask)[0].float()


def code_of(source: str, planner, vectors, actions, j: int, first: int, temperature: float,
            other: tuple[int, int, int] | None = None) -> torch.Tensor | None:
    """The K action weights sentence `j` is written under, for one code source. `other` is the
    (first sentence, sentence count) of the partner document and the count of `j`'s own
    (planner_soft_other_doc)."""
    if source == "none":
        return None
    onehot = torch.zeros(K)
    if source == "planner_soft":
        return torch.softmax(planner_logits_of(planner, vectors, j, first) / temperature, -1)
    if source == "planner_soft_other_doc":  # the partner's sentence at the same relative position
        other_first, other_count, own_count = other
        at = math.floor((j - first) * other_count / own_count)
        return torch.softmax(planner_logits_of(planner, vectors, other_first + at, other_first) / temperature, -1)
    if source == "planner_hard":
        onehot[int(planner_logits_of(planner, vectors, j, first).argmax())] = 1.0
    elif source == "oracle":
        onehot[int(actions[j])] = 1.0
    elif source == "fixed":
        onehot[0] = 1.0
    elif source == "boundary":
        onehot[(j - first) % 2] = 1.0
    elif source == "position":
        onehot[min(j - first, POSITION_CAP)] = 1.0
    elif source == "uniform":
        onehot[:] = 1.0 / K
    else:
        raise ValueError(f"no recomputation of code source {source!r}: add it here")
    return onehot


@torch.no_grad()
def document_nll(lm, ids: list[int], codes: list[torch.Tensor | None], window: int, stride: int) -> list[float]:
    """NLL of every target token 1..n-1, each scored once: the first window covers tokens [0, window),
    each later one ends `stride` tokens further and scores what the previous did not reach."""
    n = len(ids)
    nll = [math.nan] * (n - 1)
    end, first_target = min(window, n), 1
    while True:
        start = max(0, end - window)
        inputs = torch.tensor([ids[start:end]])
        weights = None if codes[0] is None else torch.stack(codes[start:end])[None]
        logprobs = torch.log_softmax(lm(input_ids=inputs, action_weights=weights).logits[0].double(), -1)
        for t in range(first_target, end):
            nll[t - 1] = -float(logprobs[t - 1 - start, ids[t]])
        if end >= n:
            return nll
        first_target, end = end, min(end + stride, n)


@functools.lru_cache(maxsize=None)
def load_lm(run: Path, selection: str):
    from planner_lm.models.conditioning import ActionConditionedLM

    return ActionConditionedLM.from_pretrained(stage_dir(run, "finetune_joint", selection) / "lm").eval()


def load_planner(path: Path):
    from planner_lm.models.planner import Planner

    return Planner.from_pretrained(path).eval()


def joint_planner(run: Path, selection: str):
    own = stage_dir(run, "finetune_joint", selection) / "planner"
    return load_planner(own if own.is_dir() else stage_dir(run, "pretrain_planner") / "planner")


def per_document_nll(run: Path, selection: str, source: str, corpus: Corpus, actions=None, vectors=None,
                     window: int = WINDOW, stride: int = STRIDE, partners: list[int] | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL and target count of every test document, `selection`'s LM with `source`'s codes;
    `partners[d]`: the document whose plan document `d` gets (planner_soft_other_doc)."""
    from transformers import AutoTokenizer

    lm_dir = stage_dir(run, "finetune_joint", selection) / "lm"
    lm, tokenizer = load_lm(run, selection), AutoTokenizer.from_pretrained(lm_dir)
    planner = joint_planner(run, selection) if source.startswith("planner") else None
    temperature = SOFT_TEMPERATURE if selection == "soft" else 1.0
    actions = corpus.actions if actions is None else actions
    vectors = corpus.embeddings if vectors is None else vectors
    sums, counts = [], []
    for d, doc in enumerate(corpus.docs):
        ids, next_sentence = tokens_of(tokenizer, doc["text"], list(doc["sent_end"]))
        first = doc["first_sentence"]
        other = None
        if partners is not None:
            partner = corpus.docs[partners[d]]
            other = partner["first_sentence"], len(partner["sent_start"]), len(doc["sent_start"])
        per_sentence = [code_of(source, planner, vectors, actions, first + i, first, temperature, other)
                        for i in range(len(doc["sent_start"]))]
        nll = document_nll(lm, ids, [per_sentence[s] for s in next_sentence], window, stride)
        sums.append(math.fsum(nll))
        counts.append(len(nll))
    return np.array(sums), np.array(counts)


def quantile(values: np.ndarray, q: float) -> float:
    """Linear interpolation between order statistics (numpy's default definition)."""
    ordered = sorted(float(v) for v in values)
    h = (len(ordered) - 1) * q
    lo = int(math.floor(h))
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (h - lo) * (ordered[hi] - ordered[lo])


def resamples(num_docs: int) -> np.ndarray:
    """The documented bootstrap: `numpy.random.default_rng(seed).integers(0, docs, (samples, docs))`."""
    return np.random.default_rng(SEED).integers(0, num_docs, size=(BOOTSTRAP, num_docs))


def ppl_of(sums, counts, picks=None) -> float:
    picks = range(len(sums)) if picks is None else picks
    total, tokens = 0.0, 0
    for d in picks:
        total += sums[d]
        tokens += counts[d]
    return math.exp(total / tokens)


def interval(point: float, samples: list[float]) -> dict[str, float]:
    alpha = (1 - CONFIDENCE) / 2
    return {"value": point, "low": quantile(np.array(samples), alpha), "high": quantile(np.array(samples), 1 - alpha)}


# ----------------------------------------------------------------------------- recomputed once
@pytest.fixture(scope="module")
def recomputed(run, metrics) -> dict:
    """Per-document NLL sums of every scored (run, code source), recomputed."""
    corpus = Corpus(run, "test")
    partners = metrics["other_document"]["partners"]
    with torch_threads(1):
        return {(row["run"], row["source"]): per_document_nll(run, row["run"], row["source"], corpus,
                                                              partners=partners)
                for row in metrics["rows"] if "ppl" in row}


# ----------------------------------------------------------------------------- perplexity and Δ
def test_perplexity_of_every_run_and_code_source(rows, recomputed):
    """PPL = exp(total NLL / tokens) per run x code source (results.md, metrics.json)."""
    assert {source for _, source in recomputed} >= set(SOURCES) and len(recomputed) >= 4 * len(SOURCES) + 1
    for key, (sums, counts) in recomputed.items():
        row = rows[key]
        assert row["tokens"] == int(counts.sum()), key
        assert row["nll"] == pytest.approx(sums.sum() / counts.sum(), rel=RTOL), key
        assert row["ppl"]["value"] == pytest.approx(ppl_of(sums, counts), rel=RTOL), key
    # the fixture's effect: every conditioned source moves the soft run's PPL by > 10x the tolerance
    plain = ppl_of(*recomputed[("soft", "none")])
    for source in SOURCES[:-1]:
        assert abs(ppl_of(*recomputed[("soft", source)]) / plain - 1) > 10 * RTOL, source


def test_perplexity_intervals_and_every_paired_change(rows, recomputed, metrics):
    """The PPL CI and every Δ vs fixed / boundary / none with its CI: the same document resamples
    for both runs (paired), Δ = ppl_run / ppl_reference - 1, percentile interval."""
    num_docs = metrics["protocol"]["test_docs"]
    picks = resamples(num_docs)
    references = {"fixed": ("fixed", "fixed"), "boundary": ("boundary", "boundary"), "none": ("none", "none")}
    effects = []
    for key, (sums, counts) in recomputed.items():
        row = rows[key]
        expected = interval(ppl_of(sums, counts), [ppl_of(sums, counts, p) for p in picks])
        for bound in ("value", "low", "high"):
            assert row["ppl"][bound] == pytest.approx(expected[bound], rel=RTOL), (key, bound)
        for name, reference in references.items():
            ref_sums, _ = recomputed[reference]
            delta = interval(ppl_of(sums, counts) / ppl_of(ref_sums, counts) - 1,
                             [ppl_of(sums, counts, p) / ppl_of(ref_sums, counts, p) - 1 for p in picks])
            for bound in ("value", "low", "high"):
                assert row[f"vs_{name}"][bound] == pytest.approx(delta[bound], abs=ATOL_DELTA), (key, name, bound)
            if key != reference and not (name == "none" and key[1] == "none"):  # a plain LM is the plain LM
                effects.append(abs(delta["value"]))
    assert min(effects) > 10 * ATOL_DELTA  # every Δ that is not a row against itself is far from 0


def test_paired_changes_between_runs(rows, recomputed, metrics, run):
    """Each `run:reference` pair: Δ = ppl_run / ppl_reference - 1 of the two runs' own code sources on
    the same resampled documents; soft vs position is the position control (a code that knows only
    the sentence's index: what the plan buys beyond "where in the document")."""
    picks = resamples(metrics["protocol"]["test_docs"])
    own = {key[0]: key for key, row in rows.items() if row.get("matched")}
    assert [pair["label"] for pair in metrics["pairs"]] == ["soft vs boundary", "fixed vs none", "soft vs position"]
    for pair in metrics["pairs"]:
        (sums, counts), (ref_sums, _) = recomputed[own[pair["run"]]], recomputed[own[pair["reference"]]]
        delta = interval(ppl_of(sums, counts) / ppl_of(ref_sums, counts) - 1,
                         [ppl_of(sums, counts, p) / ppl_of(ref_sums, counts, p) - 1 for p in picks])
        for bound in ("value", "low", "high"):
            assert pair["change"][bound] == pytest.approx(delta[bound], abs=ATOL_DELTA), (pair["label"], bound)
        assert abs(delta["value"]) > 10 * ATOL_DELTA
    results = (stage_dir(run, "evaluate") / "results.md").read_text()
    shown = f"{metrics['pairs'][0]['change']['value']:+.2%}"
    assert f"| soft vs boundary | {shown} [" in results


def test_own_plan_against_another_documents_plan(rows, recomputed, metrics, run):
    """The content control: each test document's plan swapped for another's, a derangement that
    never gives a document itself or its corpus neighbour, the partner's sentence at the same
    relative position; its paired Δ = ppl_own / ppl_other - 1 on the same resampled documents."""
    partners = metrics["other_document"]["partners"]
    docs = len(Corpus(run, "test").docs)
    assert sorted(partners) == list(range(docs)) and docs >= 4  # each plan used once; neighbours avoidable
    assert all(abs(p - d) > 1 for d, p in enumerate(partners))  # never itself, never the next or previous
    picks = resamples(metrics["protocol"]["test_docs"])
    (control,) = metrics["content_controls"]
    assert (control["run"], control["source"], control["control"]) == ("soft", "planner_soft",
                                                                       "planner_soft_other_doc")
    (sums, counts), (other_sums, _) = recomputed[("soft", "planner_soft")], recomputed[("soft", "planner_soft_other_doc")]
    delta = interval(ppl_of(sums, counts) / ppl_of(other_sums, counts) - 1,
                     [ppl_of(sums, counts, p) / ppl_of(other_sums, counts, p) - 1 for p in picks])
    for bound in ("value", "low", "high"):
        assert control["change"][bound] == pytest.approx(delta[bound], abs=ATOL_DELTA), bound
    assert abs(delta["value"]) > 10 * ATOL_DELTA
    results = (stage_dir(run, "evaluate") / "results.md").read_text()
    assert f"| soft: own plan vs another document's | {control['change']['value']:+.2%} [" in results


def test_bf16_figures_against_an_independent_fp32_recomputation(bf16, recomputed):
    """Figures scored with bf16 autocast (CPU; the evaluation's `--precision bf16`) against the fp32
    recomputation here (fp32 forward passes, float64 sums): PPL within 0.05 % relative, every Δ
    within 0.05 points, tighter than the smallest Δ the project reports (0.08 %). And the gap the
    evaluation measured and reports: its fp32 side recomputed, its bf16 side within the same bound."""
    compared = 0
    for row in bf16["rows"]:
        if "ppl" not in row:
            continue
        sums, counts = recomputed[(row["run"], row["source"])]
        assert row["ppl"]["value"] == pytest.approx(ppl_of(sums, counts), rel=BF16_RTOL), row["label"]
        fixed_sums, _ = recomputed[("fixed", "fixed")]
        delta = ppl_of(sums, counts) / ppl_of(fixed_sums, counts) - 1
        assert row["vs_fixed"]["value"] == pytest.approx(delta, abs=BF16_RTOL), row["label"]
        compared += abs(delta) > 10 * BF16_RTOL  # Δs far beyond the tolerance: a swapped run would fail
    (control,) = bf16["content_controls"]
    (sums, counts), (other_sums, _) = recomputed[("soft", "planner_soft")], recomputed[("soft", "planner_soft_other_doc")]
    assert control["change"]["value"] == pytest.approx(ppl_of(sums, counts) / ppl_of(other_sums, counts) - 1,
                                                       abs=BF16_RTOL)
    assert compared >= 4
    check = bf16["precision_check"]  # the measured gap: the first run's own codes on the first documents
    sums, counts = recomputed[(check["run"], check["source"])]
    first = range(PRECISION_CHECK_DOCS)
    assert (check["run"], check["source"], check["docs"]) == ("soft", "planner_soft", PRECISION_CHECK_DOCS)
    assert check["tokens"] == sum(counts[d] for d in first)
    assert check["ppl_fp32"] == pytest.approx(ppl_of(sums, counts, first), rel=RTOL)
    assert check["ppl_bf16"] == pytest.approx(ppl_of(sums, counts, first), rel=BF16_RTOL)
    assert check["rel_diff"] == pytest.approx(check["ppl_bf16"] / check["ppl_fp32"] - 1, abs=1e-12)
    assert check["rel_diff"] != 0 and bf16["protocol"]["precision"] == "bf16"  # bf16 did run


def test_perplexity_by_document_length(rows, recomputed, run):
    """The by-length table: token-weighted PPL of the documents whose sentence count lies in each
    bucket `lo-hi` (or `lo+`), for every run's matched row."""
    sentences = [len(doc["sent_start"]) for doc in Corpus(run, "test").docs]
    seen = {}
    for key, (sums, counts) in recomputed.items():
        row = rows[key]
        if not row["matched"]:
            continue
        assert row["by_length"], key
        for label, value in row["by_length"].items():
            lo, hi = (int(label[:-1]), math.inf) if label.endswith("+") else map(int, label.split("-"))
            docs = [d for d, n in enumerate(sentences) if lo <= n <= hi]
            assert value["docs"] == len(docs) and value["tokens"] == sum(counts[d] for d in docs), (key, label)
            assert value["ppl"] == pytest.approx(ppl_of(sums, counts, docs), rel=RTOL), (key, label)
            seen.setdefault(key, []).append(value["ppl"])
        covered = sum(value["docs"] for value in row["by_length"].values())
        assert covered == len(sentences), key  # every document in exactly one bucket
    # the fixture has documents in several buckets whose PPLs differ by far more than the tolerance
    assert all(len(v) >= 2 and max(v) / min(v) - 1 > 10 * RTOL for v in seen.values()), seen


# ----------------------------------------------------------------------------- planner accuracy
def planner_accuracy(planner, corpus: Corpus, sentences, targets) -> dict[str, float]:
    """top-1, top-5 and mean rank (1 + actions with a strictly higher logit) against `targets`."""
    ranks = []
    for (j, first, _), target in zip(sentences, targets):
        logits = planner_logits_of(planner, corpus.embeddings, j, first)
        ranks.append(1 + sum(int(logits[a] > logits[int(target)]) for a in range(K)))
    return {"top1": sum(r == 1 for r in ranks) / len(ranks), "top5": sum(r <= 5 for r in ranks) / len(ranks),
            "mean_rank": sum(ranks) / len(ranks)}


def test_planner_accuracy_against_the_true_next_actions(run, metrics, rows):
    """Planner top-1 / top-5 / mean rank of the pretrained and the jointly tuned planner on every
    test sentence, from the true previous sentences' embeddings (teacher forcing)."""
    corpus = Corpus(run, "test")
    sentences = list(corpus.sentences())
    assert 1 / len(sentences) > 10 * 1e-6
    true = [corpus.actions[j] for j, _, _ in sentences]
    shifted = [corpus.actions[j - 1] if j > first else -1 for j, first, _ in sentences]  # the previous action
    for name, path in (("pretrained", stage_dir(run, "pretrain_planner") / "planner"),
                       ("soft", stage_dir(run, "finetune_joint", "soft") / "planner")):
        with torch_threads(1):
            expected = planner_accuracy(load_planner(path), corpus, sentences, true)
            off_by_one = planner_accuracy(load_planner(path), corpus, sentences, shifted)
        reported = metrics["planner"][name]
        # the figures are fp32 means: exact up to fp32 rounding (1e-6), one sentence moves them by 1 / M
        assert reported["top1"] == pytest.approx(expected["top1"], abs=1e-6), name
        assert reported["top5"] == pytest.approx(expected["top5"], abs=1e-6), name
        assert reported["mean_rank"] == pytest.approx(expected["mean_rank"], rel=1e-6), name
        row = rows[("soft", "planner_soft")] if name == "soft" else rows[("pretrained", "-")]
        assert {k: row[k] for k in ("top1", "top5", "mean_rank")} == {k: reported[k] for k in ("top1", "top5",
                                                                                             "mean_rank")}
        # the fixture tells the true next action from the previous sentence's action
        assert max(abs(expected[k] - off_by_one[k]) for k in expected) >= 1 / len(sentences), name
    # the trained planner learnt the planted rule; the joint run's planner is random
    assert metrics["planner"]["pretrained"]["top1"] > metrics["planner"]["soft"]["top1"] + 0.1


def content_free(run: Path, corpus_actions, targets) -> dict[str, float]:
    """Majority / previous / bigram predictions from the run's training split, on `targets`:
    a list of (true action, previous action in the document or None at a document start)."""
    train = Corpus(run, "train")
    actions = train.actions
    counts = Counter(int(actions[j]) for j, _, _ in train.sentences())
    order = sorted(range(K), key=lambda a: (-counts[a], a))
    transitions: dict = {}
    for j, first, _ in train.sentences():
        previous = int(actions[j - 1]) if j > first else None
        transitions.setdefault(previous, Counter())[int(actions[j])] += 1

    def bigram(previous):
        row = transitions.get(previous) or counts  # never seen after that action: global counts
        return sorted(range(K), key=lambda a: (-row[a], -counts[a], a))

    n = len(targets)
    return {
        "majority_top1": sum(t == order[0] for t, _ in targets) / n,
        "majority_top5": sum(t in order[:5] for t, _ in targets) / n,
        "previous_top1": sum(t == (order[0] if p is None else p) for t, p in targets) / n,
        "bigram_top1": sum(t == bigram(p)[0] for t, p in targets) / n,
        "bigram_top5": sum(t in bigram(p)[:5] for t, p in targets) / n,
    }


def targets_of(corpus) -> list:
    return [(int(corpus.actions[j]), int(corpus.actions[j - 1]) if j > first else None)
            for j, first, _ in corpus.sentences()]


def test_content_free_baselines(run, metrics):
    """Majority action of the training split, the previous sentence's action (majority at a
    document start), the training split's action bigram: on the test sentences; and in results.md."""
    expected = content_free(run, None, targets_of(Corpus(run, "test")))
    assert metrics["planner_baselines"] == pytest.approx(expected, abs=1e-12)
    # the planted rule makes them three different figures (one sentence moves them by 1 / M)
    assert len({expected["majority_top1"], expected["previous_top1"], expected["bigram_top1"]}) == 3
    text = (stage_dir(run, "evaluate") / "results.md").read_text()
    assert (f"majority action {expected['majority_top1']:.1%}, previous sentence's action "
            f"{expected['previous_top1']:.1%}, action bigram of the training split {expected['bigram_top1']:.1%}") in text


def test_planner_lead_of_a_folder_without_an_evaluation(run, metrics):
    """`compare --verdicts` on a folder whose joint runs were never evaluated (the other-precision
    check retrains only the planner) reads the planner's test top-1 and copying's from the planner
    stage: the same figures, recomputed here from the true next actions."""
    from planner_lm.evaluation.compare import planner_lead
    from planner_lm.run_folder import RunFolder

    corpus = Corpus(run, "test")
    sentences = list(corpus.sentences())
    with torch_threads(1):
        expected = planner_accuracy(load_planner(stage_dir(run, "pretrain_planner") / "planner"), corpus, sentences,
                                    [corpus.actions[j] for j, _, _ in sentences])["top1"]
    copying = content_free(run, None, targets_of(corpus))["previous_top1"]
    top1, previous = planner_lead(RunFolder(run))
    assert (top1, previous) == (pytest.approx(expected, abs=1e-6), pytest.approx(copying, abs=1e-12))
    assert abs(expected - copying) > 10 * 1e-6  # the lead is not zero: a swapped pair would fail


def test_planner_stage_table(run, capsys):
    """`pretrain-planner`'s validation table (manifest metrics, rounded to 6 decimals): the
    exported planner on every validation sentence, and the content-free baselines there."""
    from planner_lm.artifacts import read_manifest

    reported = read_manifest(stage_dir(run, "pretrain_planner"), "pretrain_planner").metrics
    val = Corpus(run, "val")
    sentences = list(val.sentences())
    with torch_threads(1):
        expected = planner_accuracy(load_planner(stage_dir(run, "pretrain_planner") / "planner"), val, sentences,
                                    [val.actions[j] for j, _, _ in sentences])
    for key in ("top1", "top5", "mean_rank"):
        assert reported[f"val/{key}"] == pytest.approx(expected[key], abs=1e-6), key
    baselines = content_free(run, None, targets_of(val))
    for key, value in baselines.items():
        assert reported[f"val/baseline_{key}"] == pytest.approx(value, abs=1e-6), key
    assert len({round(v, 6) for v in (expected["top1"], baselines["majority_top1"], baselines["previous_top1"],
                                      baselines["bigram_top1"])}) == 4


# ----------------------------------------------------------------------------- another corpus
def nearest_centroid(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Argmin of the squared Euclidean distance, one sentence at a time."""
    return np.array([int(np.argmin(((centroids - v[None]) ** 2).sum(1))) for v in vectors], dtype=np.int64)


class OutsideCorpus(Corpus):
    """Documents handed to evaluate as `--corpus.name`, split, encoded and assigned here."""

    def __init__(self, run: Path, documents: list[list[str]]) -> None:
        self.docs, first, texts = [], 0, []
        for sentences in documents:
            ends, at = [], 0
            for sentence in sentences:
                ends.append(at + len(sentence))
                at += len(sentence) + 1
            self.docs.append({"text": " ".join(sentences), "sent_start": [e - len(s) for e, s in zip(ends, sentences)],
                              "sent_end": ends, "first_sentence": first})
            first += len(sentences)
            texts.extend(sentences)
        self.vectors = hash_encoder(texts).numpy()
        self.actions = nearest_centroid(self.vectors, np.load(stage_dir(run, "cluster") / "centroids.npy"))
        self.embeddings = self.vectors.astype(np.float16).astype(np.float32)  # stored as float16, like embeddings.npy


OUTSIDE = [["red.", "blue gold.", "green red white.", "gold.", "black blue."],
           ["white white.", "gray.", "red blue.", "brown gold green."],
           ["gold.", "green white.", "blue red gray.", "white.", "red.", "brown blue."],
           ["gray gray.", "black."]]


@pytest.fixture(scope="module")
def outside(run, metrics, tmp_path_factory) -> tuple[dict, OutsideCorpus]:
    path = tmp_path_factory.mktemp("corpus") / "outside.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(doc)}) + "\n" for doc in OUTSIDE))
    _evaluate(run, "--corpus.name", str(path), "--runs", "[soft, fixed]", "--structure.docs", "0", pairs="[soft:fixed]")
    return (json.loads((run / "5_eval-outside" / "metrics.json").read_text()), OutsideCorpus(run, OUTSIDE))


def test_actions_assigned_to_another_corpus(run, outside):
    """Each outside sentence's action is its nearest centroid: the oracle PPL, the planner's accuracy
    and the baselines on that corpus, recomputed from actions assigned here in numpy."""
    reported, corpus = outside
    stored = np.load(run / "5_eval-outside" / "corpus" / "sentence_vectors.npy")
    np.testing.assert_allclose(stored.astype(np.float32), corpus.vectors, atol=1e-3)  # same sentences, in order
    rows = {(r["run"], r["source"]): r for r in reported["rows"]}
    with torch_threads(1):
        for source in ("oracle", "planner_soft", "fixed"):
            sums, counts = per_document_nll(run, "soft", source, corpus)
            assert rows[("soft", source)]["tokens"] == counts.sum()
            assert rows[("soft", source)]["ppl"]["value"] == pytest.approx(ppl_of(sums, counts), rel=RTOL), source
        # the fixture's effect: a different assignment (every action moved by one) moves the oracle PPL
        moved = per_document_nll(run, "soft", "oracle", corpus, actions=(corpus.actions + 1) % K)
        assert abs(ppl_of(*moved) / ppl_of(sums, counts) - 1) > 10 * RTOL
        sentences = list(corpus.sentences())
        planner = planner_accuracy(joint_planner(run, "soft"), corpus, sentences, corpus.actions)
    assert reported["planner"]["soft"]["top1"] == pytest.approx(planner["top1"], abs=1e-6)
    assert reported["planner"]["soft"]["mean_rank"] == pytest.approx(planner["mean_rank"], rel=1e-6)
    assert reported["planner_baselines"] == pytest.approx(content_free(run, None, targets_of(corpus)), abs=1e-12)
    assert len(set(corpus.actions.tolist())) >= 4


# ----------------------------------------------------------------------------- the harness model
HARNESS_SENTENCES = ["red.", "blue gold.", "green red white.", "gold.", "black blue.", "white."]
MAX_LENGTH = 8


def harness_codes(run: Path, selection: str, sentences: list[str], leak: bool = False) -> list:
    """Per sentence: the planner reading the encoded sentences before it (soft, the run's
    temperature), or the fixed control; `leak` lets the planner read the sentence itself too."""
    vectors = hash_encoder(sentences).numpy()
    if selection == "fixed":
        return [code_of("fixed", None, None, None, j, 0, 1.0) for j in range(len(sentences))]
    planner = joint_planner(run, selection)
    return [torch.softmax(planner_logits_of(planner, vectors, j + leak, 0) / SOFT_TEMPERATURE, -1)
            for j in range(len(sentences))]


def harness_expected(run: Path, selection: str, context: list[str], continuation: list[str], leak: bool = False):
    """(rolling log p(text), log p(continuation | context), greedy?) by token loops."""
    from transformers import AutoTokenizer

    sentences = [*context, *continuation]
    text = " ".join(sentences)
    ends = [len(" ".join(sentences[:i + 1])) for i in range(len(sentences))]
    tokenizer = AutoTokenizer.from_pretrained(stage_dir(run, "finetune_joint", selection) / "lm")
    ids, next_sentence = tokens_of(tokenizer, text, ends)
    per_sentence = harness_codes(run, selection, sentences, leak)
    codes = [per_sentence[s] for s in next_sentence]
    lm = load_lm(run, selection)
    rolling = -math.fsum(document_nll(lm, ids, codes, MAX_LENGTH, MAX_LENGTH - 1))
    # continuation: its tokens are the last ones; the inputs are the last MAX_LENGTH tokens before the final one
    context_tokens = len(tokenizer(" ".join(context), add_special_tokens=False)["input_ids"])
    n = len(ids)
    start = max(0, n - 1 - MAX_LENGTH)
    with torch.no_grad():
        logits = lm(input_ids=torch.tensor([ids[start:n - 1]]),
                    action_weights=torch.stack(codes[start:n - 1])[None]).logits[0].double()
    logprobs = torch.log_softmax(logits, -1)
    targets = range(1 + context_tokens, n)
    loglik = math.fsum(float(logprobs[t - 1 - start, ids[t]]) for t in targets)
    greedy = all(int(logprobs[t - 1 - start].argmax()) == ids[t] for t in targets)
    return rolling, loglik, greedy


def test_harness_loglikelihoods_with_the_planner_in_the_loop(run, monkeypatch):
    """`planner-lm`'s rolling log-likelihood (perplexity tasks) and continuation log-likelihood:
    every token conditioned on the planner's code for the sentence of the next token, the planner
    reading only the sentences before it; windows of `max_length` tokens. fp32: rel 1e-5."""
    import planner_lm.sentence_vectors
    from planner_lm.planned_scoring import PlannedLM

    monkeypatch.setattr(planner_lm.sentence_vectors, "load_sentence_encoder", lambda settings, device: hash_encoder)
    context, continuation = HARNESS_SENTENCES[:4], HARNESS_SENTENCES[4:]
    text = " ".join(HARNESS_SENTENCES)
    results = {}
    with torch_threads(1):
        for selection in ("soft", "fixed"):
            model = PlannedLM(stage_dir(run, "finetune_joint", selection), device="cpu", max_length=MAX_LENGTH)
            rolling, loglik, greedy = harness_expected(run, selection, context, continuation)
            assert model.rolling_loglikelihood(text) == pytest.approx(rolling, rel=RTOL), selection
            got, got_greedy = model.loglikelihood(" ".join(context), " " + " ".join(continuation))
            assert got == pytest.approx(loglik, rel=RTOL) and got_greedy == greedy, selection
            results[selection] = rolling, loglik
        leaked = harness_expected(run, "soft", context, continuation, leak=True)
    # the fixture's effects: the plan (soft vs fixed) and what the planner reads move both figures by > 10x RTOL
    for figure in (0, 1):
        assert abs(results["soft"][figure] / results["fixed"][figure] - 1) > 10 * RTOL
        assert abs(leaked[figure] / results["soft"][figure] - 1) > 10 * RTOL
    assert len(HARNESS_SENTENCES) * 2 + 1 > MAX_LENGTH + 2  # several rolling windows


# ----------------------------------------------------------------------------- structure metrics
def rouge2_f(generated: str, reference: str) -> float:
    """Bigram overlap F-measure over lower-cased alphanumeric words (rouge-score's tokenization;
    its Porter stemming leaves this fixture's colour words unchanged, checked below)."""
    def bigrams(text):
        words = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
        return Counter(zip(words, words[1:]))

    ours, theirs = bigrams(generated), bigrams(reference)
    overlap = sum(min(count, theirs[b]) for b, count in ours.items())
    if not overlap:
        return 0.0
    precision, recall = overlap / sum(ours.values()), overlap / sum(theirs.values())
    return 2 * precision * recall / (precision + recall)


def levenshtein(a: list[int], b: list[int]) -> int:
    table = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = min(table[i - 1][j] + 1, table[i][j - 1] + 1, table[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return table[len(a)][len(b)]


def actions_of(texts: list[str], centroids: np.ndarray) -> list[int]:
    return nearest_centroid(hash_encoder(texts).numpy(), centroids).tolist() if texts else []


def test_structure_metrics_of_the_generations(run, metrics):
    """ROUGE-2 F against the true continuation, action edit distance (raw and over the longer
    length) and plan following, from generations.jsonl: the first documents with more than the
    prompt's sentences, continuations split into sentences (Punkt), encoded, nearest centroid."""
    import nupunkt
    from nltk.stem.porter import PorterStemmer

    assert all(PorterStemmer().stem(w) == w for w in ACTION_WORDS if len(w) > 3)
    test = Corpus(run, "test")
    centroids = np.load(stage_dir(run, "cluster") / "centroids.npy")
    task = [doc for doc in test.docs if len(doc["sent_start"]) > PROMPT_SENTENCES][:STRUCTURE_DOCS]
    references = [doc["text"][doc["sent_start"][PROMPT_SENTENCES]:] for doc in task]
    true = [test.actions[doc["first_sentence"] + PROMPT_SENTENCES:doc["first_sentence"] + len(doc["sent_start"])].tolist()
            for doc in task]
    lines = [json.loads(line) for line in (stage_dir(run, "evaluate") / "generations.jsonl").read_text().splitlines()]
    figures = {}
    for selection, reported in metrics["structure"].items():
        generations = [g for g in lines if g["run"] == selection]
        assert [g["prompt"] for g in generations] == [d["text"][:d["sent_end"][PROMPT_SENTENCES - 1]] for d in task]
        rouge = [rouge2_f(g["continuation"], ref) for g, ref in zip(generations, references)]
        realized = []
        for g in generations:
            pieces = [g["continuation"][a:b].strip() for a, b in nupunkt.sent_spans(g["continuation"])]
            realized.append(actions_of([p for p in pieces if p], centroids))
        edits = [levenshtein(r, t) for r, t in zip(realized, true)]
        normalized = [e / max(len(r), len(t), 1) for e, r, t in zip(edits, realized, true)]
        judged = []
        for g in generations:
            sentences = [s for s in g["sentences"] if not s["in_prompt"] and s["text"]]
            if sentences and not g["stopped_at_eos"]:
                sentences = sentences[:-1]  # cut by the token limit: unfinished
            judged += [s for s in sentences if s["source"] in ("planner", "forced", "fixed", "boundary", "position")]
        own = actions_of([s["text"] for s in judged], centroids)
        expected = {"rouge2": sum(rouge) / len(rouge), "edit": sum(edits) / len(edits),
                    "edit_normalized": sum(normalized) / len(normalized),
                    "follow": sum(s["action"] == a for s, a in zip(judged, own)) / len(judged) if judged else None}
        assert reported["docs"] == len(task) and reported["judged_sentences"] == len(judged), selection
        for key, value in expected.items():
            assert reported[key] == (None if value is None else pytest.approx(value, abs=1e-12)), (selection, key)
        figures[selection] = expected
    # the fixture's effects: non-trivial figures that differ between runs
    assert figures["none"]["follow"] is None
    assert max(f["rouge2"] for f in figures.values()) > 0.05
    assert len({round(f["edit"], 9) for f in figures.values()}) > 1
    assert 0 < max(f["follow"] for f in figures.values() if f["follow"] is not None) < 1
