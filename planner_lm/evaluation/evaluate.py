"""The `evaluate` stage: the papers' comparison table in one command.

For every finished `4_joint-<selection>/` run of the run directory it measures test perplexity
with each code source the conditioned LM can be given at evaluation time (planner soft / hard,
oracle, fixed, uniform, none), with bootstrap CIs over documents and the paired relative change
against the parameter-matched `fixed` control and the plain LM (`none`); planner accuracy for
the pretrained planner and each jointly tuned one (did joint training make it forget?); and
structure metrics of planner-in-the-loop generations on a few test documents. Everything goes to
`5_eval/`: `metrics.json`, `results.md`, PNG plots and TensorBoard.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from planner_lm.artifacts import atomic_write_text, read_manifest, stage_dir, start_stage, write_manifest
from planner_lm.data.planner_data import action_baselines
from planner_lm.errors import UserError
from planner_lm.evaluation.bootstrap import Interval, ppl_interval, relative_change_interval, resample_indices
from planner_lm.evaluation.perplexity import (
    PerplexityResult,
    ScoringDocument,
    causal_lm_logprobs,
    nll_by_position,
    sliding_window_nll,
)
from planner_lm.evaluation.planner_metrics import planner_logits, planner_scores
from planner_lm.generation import GENERATION_CONDITIONING, run_temperature
from planner_lm.evaluation.report import (
    SIGNIFICANT_MARK,
    Column,
    log_to_tensorboard,
    plot_nll_by_position,
    plot_ppl_intervals,
    results_markdown,
)
from planner_lm.models.selection import select_weights
from planner_lm.prepared import PreparedCorpus

STAGE = "evaluate"
CODE_SOURCES = ("planner_soft", "planner_hard", "oracle", "fixed", "boundary", "uniform", "none")
MATCHED_SOURCE = {
    "soft": "planner_soft", "gumbel": "planner_soft", "hard": "planner_hard",
    "straight_through": "planner_hard", "oracle": "oracle", "fixed": "fixed",
    "boundary": "boundary", "uniform": "uniform", "none": "none",
}
"""The code source a run was trained with: its headline row."""
RUN_ORDER = ("soft", "gumbel", "straight_through", "hard", "oracle", "boundary", "uniform", "fixed", "none")
REFERENCES = ("fixed", "boundary", "none")
"""Controls every row is compared with (paired, per document): the parameter-matched constant
code, the content-free sentence-boundary code, and the plain LM."""


@dataclass
class StructureConfig:
    """Planner-in-the-loop generation on test documents (ROUGE-2, action edit distance, plan following).

    Args:
        docs: number of test documents to generate from (0 = skip structure metrics).
        prompt_sentences: leading sentences of each document given as the prompt.
        max_new_tokens: tokens generated per document.
        temperature: token sampling temperature (the papers: 1.0).
        top_p: nucleus sampling threshold (1.0 = off, as the papers).
        batch_size: documents generated together.
    """

    docs: int = 50
    prompt_sentences: int = 2
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16


@dataclass
class EvaluateConfig:
    """Settings of the evaluate stage.

    Args:
        run_dir: run directory; reads every finished `4_joint-*` run and writes `<run_dir>/5_eval`.
        runs: selections to evaluate (e.g. `[soft, none, fixed]`); None = every finished run.
        code_sources: code sources scored for each conditioned run, from planner_soft,
            planner_hard, oracle, fixed, uniform, none, and `matched` (the source the run was
            trained with: soft -> planner_soft, hard -> planner_hard, oracle -> oracle, ...).
            The `none` run is only scored with none; the matched source is always scored.
        window: tokens per scoring window, context included (the papers: 128).
        stride: tokens between windows; 1 = the papers' exact protocol (every token with the
            full window of context), window-1 = non-overlapping windows (fastest).
        batch_size: windows per forward pass.
        max_docs: evaluate only the first N test documents (None = all).
        bootstrap_samples: resamples of the test documents for the confidence intervals.
        confidence: confidence level of the intervals.
        structure: generation-based structure metrics.
        device: `auto` (CUDA when available), `cpu` or `cuda[:i]`.
        precision: `32` or `bf16` (autocast; fast on GPUs). With bf16 the first run is also
            scored in 32 on `precision_check_docs` documents and the difference is reported.
        precision_check_docs: documents of that check (0 = skip it).
        seed: seed of the bootstrap and of sampling.
        overwrite: replace a finished evaluation made with a different config.
    """

    run_dir: str = "runs/demo"
    runs: list[str] | None = None
    code_sources: list[str] = field(default_factory=lambda: list(CODE_SOURCES))
    window: int = 128
    stride: int = 64
    batch_size: int = 32
    max_docs: int | None = None
    bootstrap_samples: int = 1000
    confidence: float = 0.95
    structure: StructureConfig = field(default_factory=StructureConfig)
    device: str = "auto"
    precision: str = "32"
    precision_check_docs: int = 20
    seed: int = 0
    overwrite: bool = False


# --------------------------------------------------------------------------- upstream
@dataclass
class JointRun:
    """A finished `4_joint-<selection>` directory."""

    selection: str
    dir: Path
    manifest: Any
    planner_path: Path | None


def find_runs(run_dir: Path, wanted: list[str] | None) -> list[JointRun]:
    """Finished joint runs of ``run_dir``, in the table's order."""
    found: dict[str, JointRun] = {}
    for path in sorted(run_dir.glob("4_joint-*")):
        selection = path.name[len("4_joint-"):]
        if wanted is not None and selection not in wanted:
            continue
        if wanted is None and not (path / "manifest.json").is_file():
            print(f"skipping {path}: unfinished (no manifest.json)")
            continue
        manifest = read_manifest(path, "finetune_joint")
        planner = path / "planner.pt"
        found[selection] = JointRun(selection, path, manifest, planner if planner.is_file() else None)
    if wanted is not None:
        missing = [s for s in wanted if s not in found]
        if missing:
            raise UserError(
                f"no finished run for selection(s) {', '.join(missing)} in {run_dir}; run "
                "`make finetune-joint` (soft) / `make baselines`, or drop them from --runs"
            )
    if not found:
        raise UserError(
            f"{run_dir} holds no finished 4_joint-* run; run `make finetune-joint` and `make baselines` first"
        )
    rank = {name: i for i, name in enumerate(RUN_ORDER)}
    return sorted(found.values(), key=lambda r: (rank.get(r.selection, len(rank)), r.selection))


@dataclass
class TestSet:
    """The scored test documents and their sentences (global ids ``first .. first + n - 1``)."""

    documents: list[ScoringDocument]
    texts: list[str]
    spans: list[list[tuple[int, int]]]
    doc_first: list[int]
    first: int
    sentence_ids: torch.Tensor
    sentence_doc_first: torch.Tensor
    actions: torch.Tensor


def load_test_set(prepared: PreparedCorpus, tokenizer: Any, fingerprint: str, run_dir: Path,
                  actions: np.ndarray, max_docs: int | None) -> TestSet:
    """Tokenize the test split once (shared cache with the joint stage) and pick the documents."""
    from planner_lm.data.lm_windows import load_or_build_token_cache

    split = prepared.split("test")
    tokens = load_or_build_token_cache(split, tokenizer, run_dir / "tokens" / prepared.manifest.hash, "test",
                                       fingerprint)
    count = len(split) if max_docs is None else min(max_docs, len(split))
    if count == 0:
        raise UserError("the test split has no documents; re-run `make prepare` with split.test_docs > 0")
    rows = split.select(range(count))
    documents, texts, spans, firsts = [], [], [], []
    for doc, row in enumerate(rows):
        lo, hi = int(tokens.doc_offsets[doc]), int(tokens.doc_offsets[doc + 1])
        documents.append(ScoringDocument(torch.from_numpy(np.array(tokens.input_ids[lo:hi], dtype=np.int64)),
                                         torch.from_numpy(np.array(tokens.target_sentence[lo:hi], dtype=np.int64))))
        texts.append(row["text"])
        spans.append(list(zip(row["sent_start"], row["sent_end"])))
        firsts.append(int(row["first_sentence"]))
    first = firsts[0]
    last = firsts[-1] + len(spans[-1])
    ids = torch.arange(first, last)
    doc_first = torch.from_numpy(np.repeat(firsts, [len(s) for s in spans]).astype(np.int64))
    true = torch.from_numpy(np.array(actions[first:last], dtype=np.int64))
    return TestSet(documents, texts, spans, firsts, first, ids, doc_first, true)


# --------------------------------------------------------------------------- scoring
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def code_weights(source: str, logits: torch.Tensor | None, actions: torch.Tensor, num_actions: int,
                 positions: torch.Tensor, temperature: float = 1.0) -> torch.Tensor | None:
    """Per-sentence action weights ``[M, K]`` of one code source (None for ``none``).

    ``positions`` is each sentence's index in its document (boundary); ``temperature`` is the
    softmax temperature the run was trained with (planner_soft).
    """
    if source == "planner_soft":
        return select_weights(logits, "soft", temperature=temperature)
    if source == "planner_hard":
        return select_weights(logits, "hard")
    if source == "oracle":
        return select_weights(None, "oracle", oracle_actions=actions, num_actions=num_actions)
    if source == "boundary":
        return select_weights(None, "boundary", sentence_index=positions, num_actions=num_actions)
    if source in ("fixed", "uniform"):
        return select_weights(None, source, num_actions=num_actions, batch_shape=(len(actions),))
    if source == "none":
        return None
    raise UserError(f"unknown code source {source!r}; choose from {', '.join(CODE_SOURCES)}")


def make_scorer(lm: torch.nn.Module, table: torch.Tensor | None, first: int, device: torch.device, precision: str):
    """A ``TokenScorer`` that conditions each token on its target sentence's row of ``table``."""
    table = None if table is None else table.to(device)
    autocast = precision == "bf16"

    def score(ids: torch.Tensor, mask: torch.Tensor, cond: torch.Tensor, keep: int) -> torch.Tensor:
        weights = None
        if table is not None:
            rows = (cond - first).clamp(min=0, max=len(table) - 1)
            weights = table[rows] * (cond >= 0).unsqueeze(-1).to(table.dtype)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return causal_lm_logprobs(lm, ids, mask, keep, action_weights=weights)

    return score


def _none_key(run: JointRun) -> str | None:
    """Runs whose plain LM (no actions) is the same frozen base share one `none` score."""
    config_path = run.dir / "lm" / "conditioning_config.json"
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text())
    if config.get("base_mode") == "frozen" and not config.get("base_saved") and config.get("base_fingerprint"):
        return config["base_fingerprint"]
    return None


# --------------------------------------------------------------------------- the stage
def run_evaluate(cfg: EvaluateConfig, encoder: Any = None) -> dict[str, Any]:
    """Build `5_eval/`; returns the metrics. ``encoder`` overrides the embed stage's encoder (tests)."""
    from planner_lm.models.base_lm import load_tokenizer, tokenizer_fingerprint
    from planner_lm.models.conditioning import ActionConditionedLM
    from planner_lm.models.planner import Planner

    started = time.perf_counter()
    run_dir = Path(cfg.run_dir)
    _check_config(cfg)
    prepared = PreparedCorpus(stage_dir(run_dir, "prepare"))
    embed = read_manifest(stage_dir(run_dir, "embed"), "embed")
    cluster = read_manifest(stage_dir(run_dir, "cluster"), "cluster")
    num_actions = int(cluster.fact("num_actions"))
    cluster.require("num_sentences", prepared.num_sentences, "actions vs prepared corpus")
    embed.require("embedding_dim", int(cluster.fact("embedding_dim")), "sentence embeddings vs codebook")
    planner_dir = stage_dir(run_dir, "pretrain_planner")
    pretrained = read_manifest(planner_dir, "pretrain_planner") if (planner_dir / "manifest.json").is_file() else None
    runs = find_runs(run_dir, cfg.runs)
    for run in runs:
        run.manifest.require("num_actions", num_actions, f"{run.dir.name} vs codebook")
    fingerprints = {r.manifest.facts.get("tokenizer_fingerprint") for r in runs} - {None}
    if len(fingerprints) > 1:
        raise UserError(f"the runs in {run_dir} use different tokenizers; re-run `make finetune-joint baselines`")

    out = stage_dir(run_dir, "evaluate")
    config = asdict(cfg)
    start_stage(out, stage=STAGE, config=config, overwrite=cfg.overwrite)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    tokenizer = load_tokenizer(str(runs[0].dir / "lm")) if (runs[0].dir / "lm" / "tokenizer_config.json").is_file() \
        else load_tokenizer(str(stage_dir(run_dir, "pretrain_lm")))
    fingerprint = tokenizer_fingerprint(tokenizer)
    if fingerprints and fingerprint not in fingerprints:
        raise UserError(f"the tokenizer next to {runs[0].dir / 'lm'} is not the one the runs were trained with")
    embeddings = np.load(embed.dir / "embeddings.npy", mmap_mode="r")
    actions = np.load(cluster.dir / "actions.npy", mmap_mode="r")
    test = load_test_set(prepared, tokenizer, fingerprint, run_dir, actions, cfg.max_docs)
    num_tokens = sum(d.num_targets for d in test.documents)
    print(f"evaluating {len(runs)} run(s) on {len(test.documents)} test documents, {num_tokens} tokens, "
          f"{len(test.sentence_ids)} sentences (window {cfg.window}, stride {cfg.stride}, {device})")

    # ---- planners: the pretrained one and every jointly tuned one
    planners: dict[str, Planner] = {}
    if pretrained is not None:
        planners["pretrained"] = Planner.from_pretrained(pretrained.dir / "planner.pt")
    for run in runs:
        if run.planner_path is not None:
            planners[run.selection] = Planner.from_pretrained(run.planner_path)
    logits = {name: planner_logits(p.to(device), embeddings, test.sentence_ids, test.sentence_doc_first, device=device)
              for name, p in planners.items()}
    planner_table = {name: planner_scores(value, test.actions) for name, value in logits.items()}
    train_lo, train_hi = prepared.sentence_range("train")
    baselines = action_baselines(np.asarray(actions), np.arange(train_lo, train_hi), test.sentence_ids.numpy(),
                                 prepared.sentence_doc_first, num_actions)

    structure_eval = _structure_evaluator(cfg, test, embed, cluster, actions, tokenizer, device, encoder)
    structure: dict[str, dict[str, float]] = {}
    samples: list[dict[str, Any]] = []

    # ---- perplexity of every run with every code source, then generation
    results: dict[tuple[str, str], PerplexityResult] = {}
    none_cache: dict[str, PerplexityResult] = {}
    timings: dict[str, float] = {}
    precision_check: float | None = None
    for run in runs:
        lm = ActionConditionedLM.from_pretrained(run.dir / "lm").to(device).eval()
        run_logits = logits.get(run.selection, logits.get("pretrained"))
        sources = ["none"] if run.selection == "none" else _sources_of(run.selection, cfg.code_sources)
        for source in sources:
            if source.startswith("planner") and run_logits is None:
                print(f"  {run.selection}: no planner for {source} (run `make pretrain-planner`); skipped")
                continue
            key = _none_key(run) if source == "none" else None
            tick = time.perf_counter()
            if key is not None and key in none_cache:
                results[(run.selection, source)] = none_cache[key]
                continue
            table = code_weights(source, run_logits, test.actions, num_actions,
                                 test.sentence_ids - test.sentence_doc_first, run_temperature(run.manifest))
            scorer = make_scorer(lm, table, test.first, device, cfg.precision)
            if cfg.precision == "bf16" and cfg.precision_check_docs > 0 and precision_check is None:
                precision_check = _bf16_vs_fp32(cfg, lm, table, test, device)
                print(f"  bf16 vs fp32 on {cfg.precision_check_docs} documents: PPL {precision_check:+.3%}")
            result = sliding_window_nll(test.documents, scorer, window=cfg.window, stride=cfg.stride,
                                        batch_size=cfg.batch_size, device=device,
                                        progress=f"{run.selection} / {source}")
            results[(run.selection, source)] = result
            if key is not None:
                none_cache[key] = result
            timings[f"{run.selection}/{source}"] = round(time.perf_counter() - tick, 2)
            print(f"  {run.selection:>16} / {source:<12} ppl {result.ppl:9.3f}")
        if structure_eval is not None:
            tick = time.perf_counter()
            scored = _generate_and_score(structure_eval, run, lm, planners, tokenizer, num_actions)
            if scored is not None:
                structure[run.selection], generations = scored
                samples.extend({"run": run.selection, **g.as_dict()} for g in generations)
                timings[f"{run.selection}/generation"] = round(time.perf_counter() - tick, 2)
                print(f"  {run.selection:>16} / generation   " + ", ".join(
                    f"{k} {v:.3f}" for k, v in structure[run.selection].items() if k in ("rouge2", "edit", "follow")))
        del lm

    protocol = _run_protocol(runs, embed, num_actions, fingerprint)
    if precision_check is not None:
        protocol["bf16_vs_fp32_ppl_rel_diff"] = precision_check
    metrics = _assemble(cfg, runs, results, planner_table, baselines, structure, test, num_tokens, protocol)
    metrics["seconds"] = {"perplexity": timings, "total": round(time.perf_counter() - started, 1)}
    _write_outputs(out, cfg, runs, results, test, metrics)
    atomic_write_text(out / "generations.jsonl", "".join(json.dumps(_finite(x)) + "\n" for x in samples))
    inputs = {"prepare": prepared.dir, "embed": embed.dir, "cluster": cluster.dir,
              **({"planner": pretrained.dir} if pretrained is not None else {}),
              **{f"joint-{r.selection}": r.dir for r in runs}}
    headline = {row["label"]: row["ppl"]["value"] for row in metrics["rows"] if row.get("matched")}
    write_manifest(out, stage=STAGE, config=config, inputs=inputs,
                   outputs=["metrics.json", "results.md", "ppl.png", "nll_by_position.png", "generations.jsonl"],
                   facts={"test_docs": len(test.documents), "test_tokens": num_tokens},
                   metrics={"test/ppl": headline, "seconds": metrics["seconds"]["total"]}, seed=cfg.seed)
    print()
    print(setting_line(metrics["protocol"]))
    print(metrics["table"])
    print(f"written to {out} in {metrics['seconds']['total']:.0f} s")
    return metrics


def _run_protocol(runs: list[JointRun], embed: Any, num_actions: int, fingerprint: str) -> dict[str, Any]:
    """Facts of the compared runs that a reader needs to interpret the table (from their manifests)."""
    def common(key: str) -> Any:
        values = {str(r.manifest.facts.get(key)) for r in runs if r.manifest.facts.get(key) is not None}
        return values.pop() if len(values) == 1 else (", ".join(sorted(values)) if values else None)

    steps = sorted({int(r.manifest.metrics["steps"]) for r in runs
                    if r.manifest.facts.get("trained") and r.manifest.metrics.get("steps") is not None})
    return {"base_lm": common("lm_name"), "base_mode": common("base_mode"), "tokenizer": fingerprint[:12],
            "num_actions": num_actions, "encoder": embed.fact("encoder"),
            "joint_steps": ", ".join(map(str, steps)) or None}


def _structure_evaluator(cfg, test, embed, cluster, actions, tokenizer, device, encoder):
    """The generation task on the first test documents, or None when disabled or impossible."""
    from planner_lm.evaluation.structure_eval import StructureEvaluator, make_task
    from planner_lm.generation import SamplingConfig, load_sentence_encoder

    if cfg.structure.docs == 0:
        return None
    task = make_task(test.texts, test.spans, test.doc_first, actions, cfg.structure.prompt_sentences,
                     cfg.structure.docs)
    if not task.prompts:
        print(f"no test document has more than {cfg.structure.prompt_sentences} sentences: structure metrics skipped")
        return None
    encode = encoder or load_sentence_encoder(str(embed.fact("encoder")), device)
    centroids = torch.from_numpy(np.load(cluster.dir / "centroids.npy"))
    sampling = SamplingConfig(max_new_tokens=cfg.structure.max_new_tokens, temperature=cfg.structure.temperature,
                              top_p=cfg.structure.top_p, seed=cfg.seed)
    return StructureEvaluator(task, encode, centroids, sampling, cfg.structure.batch_size)


def _generate_and_score(evaluator, run: JointRun, lm, planners, tokenizer, num_actions):
    from planner_lm.generation import PlannerGenerator

    selection = GENERATION_CONDITIONING.get(run.selection, "soft")
    planner = planners.get(run.selection, planners.get("pretrained"))
    if planner is None and selection in ("soft", "hard"):
        print(f"  {run.selection}: no planner for generation (run `make pretrain-planner`); skipped")
        return None
    generator = PlannerGenerator(lm, tokenizer, evaluator.encode, num_actions, planner=planner)
    generations = evaluator.generate(generator, selection, run_temperature(run.manifest))
    return evaluator.score(generations), generations


def _sources_of(selection: str, requested: list[str]) -> list[str]:
    """The run's matched source first, then the requested ones (no repeats)."""
    matched = MATCHED_SOURCE.get(selection, "planner_soft")
    return list(dict.fromkeys([matched, *(matched if s == "matched" else s for s in requested)]))


def _check_config(cfg: EvaluateConfig) -> None:
    unknown = [s for s in cfg.code_sources if s not in (*CODE_SOURCES, "matched")]
    if unknown:
        raise UserError(f"unknown code source(s) {', '.join(unknown)}; choose from {', '.join(CODE_SOURCES)}, matched")
    if cfg.window < 2 or not 1 <= cfg.stride <= cfg.window - 1:
        raise UserError(f"need window >= 2 and 1 <= stride <= window - 1, got window {cfg.window}, stride {cfg.stride}")
    if cfg.precision not in ("32", "bf16"):
        raise UserError(f"precision must be '32' or 'bf16', got {cfg.precision!r}")
    if cfg.max_docs is not None and cfg.max_docs < 1:
        raise UserError(f"max_docs must be >= 1 (or null for all), got {cfg.max_docs}")
    if cfg.structure.docs < 0 or cfg.structure.prompt_sentences < 1:
        raise UserError("structure.docs must be >= 0 and structure.prompt_sentences >= 1")


# --------------------------------------------------------------------------- report
def _delta_column(reference: str) -> Column:
    return Column(f"vs_{reference}", f"Δ vs {reference} [95 % CI]", fmt="{:+.2%}", better="lower",
                  show_interval=True, mark_nonzero=True)


PPL_COLUMNS = [
    Column("ppl", "test PPL [95 % CI]", better="lower", show_interval=True),
    *(_delta_column(reference) for reference in REFERENCES),
    Column("top1", "planner top-1", fmt="{:.1%}", better="higher"),
    Column("rouge2", "ROUGE-2 F", fmt="{:.3f}", better="higher"),
    Column("follow", "plan following", fmt="{:.1%}", better="higher"),
]
"""The readable table: one row per run, scored with the code source it was trained with."""


def _assemble(cfg, runs, results, planner_table, baselines, structure, test, num_tokens, protocol) -> dict[str, Any]:
    """Every (run, code source) row with CIs and paired changes; the table keeps the matched rows."""
    indices = resample_indices(len(test.documents), cfg.bootstrap_samples, cfg.seed)
    references = {name: results.get((name, name)) for name in REFERENCES}
    if references["none"] is None:  # a conditioned run scored without actions is the same plain LM
        references["none"] = next((r for (_, source), r in results.items() if source == "none"), None)
    rows: list[dict[str, Any]] = []
    for run in runs:
        matched = MATCHED_SOURCE.get(run.selection)
        for source in [s for s in _sources_of(run.selection, cfg.code_sources) if (run.selection, s) in results]:
            result = results[(run.selection, source)]
            row: dict[str, Any] = {
                "label": f"{run.selection} · {source}",
                "run": run.selection, "source": source, "matched": source == matched,
                "ppl": ppl_interval(result.doc_nll, result.doc_tokens, indices, cfg.confidence),
                "nll": result.mean_nll, "tokens": result.num_tokens,
            }
            for name, reference in references.items():
                if reference is not None:
                    row[f"vs_{name}"] = relative_change_interval(result.doc_nll, reference.doc_nll,
                                                                 result.doc_tokens, indices, cfg.confidence)
            if source == matched:
                planner_name = run.selection if run.selection in planner_table else None
                if planner_name:
                    row.update({k: planner_table[planner_name][k] for k in ("top1", "top5", "mean_rank")})
                row.update({k: v for k, v in structure.get(run.selection, {}).items()})
            rows.append(row)
    if "pretrained" in planner_table:
        rows.append({"label": "pretrained planner", "run": "pretrained", "source": "-", "matched": False,
                     **{k: planner_table["pretrained"][k] for k in ("top1", "top5", "mean_rank")}})
    shown = [row for row in rows if row["matched"] or row["run"] == "pretrained"]
    columns = [c for c in PPL_COLUMNS if any(row.get(c.key) is not None for row in shown)]  # e.g. no `none` run
    table = results_markdown(shown, columns, label_header="run · code source")
    as_json = [{k: (v.as_dict() if isinstance(v, Interval) else v) for k, v in row.items()} for row in rows]
    return {
        "rows": as_json,
        "table": table,
        "planner": planner_table,
        "planner_baselines": baselines,
        "structure": structure,
        "protocol": {**protocol, "window": cfg.window, "stride": cfg.stride, "precision": cfg.precision,
                     "test_docs": len(test.documents), "test_tokens": num_tokens,
                     "bootstrap_samples": cfg.bootstrap_samples, "confidence": cfg.confidence},
    }


def setting_line(protocol: dict[str, Any]) -> str:
    """The one-line description of what was compared, printed above the table."""
    return (f"Setting: base LM {protocol.get('base_lm', '?')} ({protocol.get('base_mode', '?')} base weights, "
            f"{protocol.get('joint_steps', '?')} joint steps), tokenizer {protocol.get('tokenizer', '?')}, "
            f"k = {protocol.get('num_actions', '?')} actions from {protocol.get('encoder', '?')}; test split "
            f"{protocol['test_docs']} documents, {protocol['test_tokens']} tokens, window {protocol['window']}, "
            f"stride {protocol['stride']}, precision {protocol['precision']}"
            + (f" (PPL {protocol['bf16_vs_fp32_ppl_rel_diff']:+.3%} against fp32 on a subset)"
               if "bf16_vs_fp32_ppl_rel_diff" in protocol else "") + ".")


def _bf16_vs_fp32(cfg: EvaluateConfig, lm, table, test: TestSet, device: torch.device) -> float:
    """Relative PPL change of bf16 autocast against fp32 on the first test documents (one run)."""
    documents = test.documents[: cfg.precision_check_docs]
    ppl = {precision: sliding_window_nll(documents, make_scorer(lm, table, test.first, device, precision),
                                         window=cfg.window, stride=cfg.stride, batch_size=cfg.batch_size,
                                         device=device).ppl for precision in ("32", "bf16")}
    return ppl["bf16"] / ppl["32"] - 1


def _write_outputs(out: Path, cfg: EvaluateConfig, runs, results, test: TestSet, metrics: dict) -> None:
    matched_rows = [r for r in metrics["rows"] if "ppl" in r and r["matched"]]
    entries = [(r["label"], Interval(**r["ppl"])) for r in matched_rows]
    ppl_fig = plot_ppl_intervals(entries, out / "ppl.png")
    curves, reference = {}, None
    for run in runs:
        source = MATCHED_SOURCE.get(run.selection)
        if (run.selection, source) in results:
            mean, _ = nll_by_position(results[(run.selection, source)], test.documents, max_position=32)
            curves[f"{run.selection} · {source}"] = mean
            if source == "none":
                reference = f"{run.selection} · {source}"
    position_fig = plot_nll_by_position(curves, out / "nll_by_position.png", reference=reference)
    protocol = metrics["protocol"]
    notes = (
        f"Each run is scored with the code source it was trained with (the full grid of runs × code sources "
        f"is in `metrics.json`). Windows of {protocol['window']} tokens, stride {protocol['stride']} "
        f"({'the papers’ exact protocol' if protocol['stride'] == 1 else 'stride 1 is the papers’ exact protocol'}). "
        f"{protocol['confidence']:.0%} CIs: bootstrap over documents ({protocol['bootstrap_samples']} resamples). "
        "Δ columns are paired relative PPL changes (negative = better) against three controls: `fixed` "
        "(one constant action), `boundary` (an action that only marks where each sentence starts) and "
        f"`none` (the plain LM); {SIGNIFICANT_MARK.strip()} = the CI excludes 0. Best value per column in bold.\n"
    )
    baselines = metrics["planner_baselines"]
    notes += (f"\nPlanner reference accuracies on the same test sentences (no content): majority action "
              f"{baselines['majority_top1']:.1%}, previous sentence's action {baselines['previous_top1']:.1%}, "
              f"action bigram of the training split {baselines['bigram_top1']:.1%}.\n")
    body = "# Evaluation results\n\n" + setting_line(protocol) + "\n\n" + metrics["table"] + "\n" + notes
    atomic_write_text(out / "results.md", body)
    atomic_write_text(out / "metrics.json", json.dumps(_finite({k: v for k, v in metrics.items() if k != "table"}),
                                                     indent=2) + "\n")
    scalars: dict[str, float] = {}
    for row in metrics["rows"]:
        name = f"{row['run']}/{row['source']}"
        if "ppl" in row:
            scalars[f"test/ppl/{name}"] = row["ppl"]["value"]
        for key in ("top1", "top5", "mean_rank", "rouge2", "edit", "follow"):
            if row.get(key) is not None:
                scalars[f"test/{key}/{row['run']}"] = row[key]
    log_to_tensorboard(out / "tb", scalars, {"ppl": ppl_fig, "nll_by_position": position_fig}, {"results": body})


def _finite(value: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to null."""
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
