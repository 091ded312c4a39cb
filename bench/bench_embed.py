"""Embedding throughput and fidelity of each backend vs plain `SentenceTransformer.encode(batch_size=256)`.

All variants encode the same sentences (a seeded sample of a run's prepared corpus, by default
`runs/demo`, else of the bundled demo corpus) with the same encoder, in one process.

Speed, side by side: the sentences sorted by length (as `encode` sorts them) are cut into the
reference's batches of 256; each repeat passes every such unit to the reference (plain `encode`,
torch fp32) and to each variant's stage step (`SentenceEmbedder.predict_step` on length-sorted
batches of --batch_size, what `Trainer.predict` runs), in a rotating order, so load that comes
and goes hits every method alike. `speedup_vs_encode` is the median over repeats of reference
time / variant time. Fidelity: one full stage run per variant (`Trainer.predict` + shard writer +
consolidation, also timed as `stage_sentences_per_s`) against the reference's torch fp32 vectors:
mean (and min) cosine, and the share of sentences whose nearest k-means centroid (the run's
`2_cluster/centroids.npy`, when there is one) stays the same.

Variants: `torch` (the Trainer precision this host defaults to), `onnx` (ONNX Runtime fp32),
`onnx-int8` (dynamic int8), `openvino` (fp32; plus `openvino-bf16` on hosts with native bf16),
each where its extra is installed. `chosen` is the fastest variant that meets the fidelity bar
(mean cosine >= 0.995 and >= 95 % of actions kept); `auto_backend` is what `--model.backend auto`
picks on this host (`planner_lm.sentence_vectors.resolve_embed_backend`). Prints one JSON object
(progress and notes go to stderr), kept as it grows in `--json` (default bench/out/embed.json).

    .venv/bin/python bench/bench_embed.py                       # runs/demo, 2048 sentences, 3 repeats
    .venv/bin/python bench/bench_embed.py --sentences 1024 --variants torch,openvino
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import add_json_option, bench_report  # noqa: E402
from planner_lm.errors import UserError  # noqa: E402

MIN_MEAN_COSINE, MIN_ACTIONS_KEPT = 0.995, 0.95
VARIANTS = {  # name -> (backend, quantize, precision or None for this host's default)
    "torch": ("torch", False, None),
    "onnx": ("onnx", False, "32-true"),
    "onnx-int8": ("onnx", True, "32-true"),
    "openvino": ("openvino", False, "32-true"),
    "openvino-bf16": ("openvino", False, "bf16-mixed"),
}


def demo_sentences() -> list[str]:
    from planner_lm.corpus import CorpusConfig, iter_documents
    from planner_lm.sentences import sentence_spans

    texts = []
    for doc in iter_documents(CorpusConfig(name="demo")):
        texts.extend(doc.text[a:b] for a, b in sentence_spans(doc.text))
        if len(texts) > 40_000:
            break
    return texts


class Ours:
    """One variant of our stage's path, built once (model load and ONNX export are not timed)."""

    def __init__(self, encoder: str, backend: str, quantize: bool, precision: str, batch_size: int) -> None:
        from planner_lm.lit.embed import SentenceEmbedder

        self.model = SentenceEmbedder(encoder=encoder, backend=backend, quantize=quantize)
        self.precision, self.batch_size = precision, batch_size

    def step(self, texts: list[str]) -> np.ndarray:
        """The stage's work on already length-sorted texts, as Trainer.predict runs it (no Trainer)."""
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if ("bf16" in self.precision and self.model.backend == "torch"
                                                                    and not torch.cuda.is_available()) else contextlib.nullcontext()
        parts = []
        with torch.inference_mode(), autocast:
            for start in range(0, len(texts), self.batch_size):
                batch = {"texts": texts[start:start + self.batch_size], "shard": 0, "shard_size": 1, "batch": 0}
                parts.append(self.model.predict_step(batch, 0)["vectors"])
        return torch.cat(parts).float().numpy()

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, float]:
        import lightning as L
        from torch.utils.data import DataLoader

        from planner_lm.data.embed_data import EmbedPlan, SentenceBatches, length_sorted_batches
        from planner_lm.lit.embed import ShardWriter, consolidate_shards

        lengths = np.array([len(t) for t in texts])
        plan = EmbedPlan(length_sorted_batches(lengths, self.batch_size), shard_batches=16)
        with tempfile.TemporaryDirectory() as tmp:
            shard_dir = os.path.join(tmp, "shards")
            loader = DataLoader(SentenceBatches(texts, plan, list(range(plan.num_shards))), batch_size=None,
                                collate_fn=lambda item: item)
            trainer = L.Trainer(accelerator="auto", devices=1, precision=self.precision, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                callbacks=[ShardWriter(shard_dir)])
            start = time.perf_counter()
            trainer.predict(self.model, dataloaders=loader, return_predictions=False)
            out = os.path.join(tmp, "embeddings.npy")
            consolidate_shards(Path(shard_dir), plan, len(texts), Path(out))
            seconds = time.perf_counter() - start
            return np.load(out).astype(np.float32), seconds


class Reference:
    """Plain `SentenceTransformer.encode(batch_size=256)`, torch fp32."""

    def __init__(self, encoder: str) -> None:
        from sentence_transformers import SentenceTransformer

        from planner_lm.sentence_vectors import resolve_encoder_path

        self.model = SentenceTransformer(resolve_encoder_path(encoder),
                                         device="cuda" if torch.cuda.is_available() else "cpu")

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        vectors = self.model.encode(texts, batch_size=256, normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32), time.perf_counter() - start


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", default="runs/demo",
                        help="sentences (0_prepare) and centroids (2_cluster) of this run; the demo corpus if absent")
    parser.add_argument("--encoder", default="all-MiniLM-L6-v2", help="encoder name or folder")
    parser.add_argument("--sentences", type=int, default=2048, help="seeded sample size")
    parser.add_argument("--batch_size", type=int, default=128, help="our batch size (the demo preset's)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds; medians are reported")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch, ONNX Runtime, OpenVINO)")
    add_json_option(parser, "embed")
    args = parser.parse_args()
    with bench_report("embed", args.json, encoder=args.encoder) as report:
        measure(args, report)


def measure(args: argparse.Namespace, report: dict) -> None:
    from planner_lm.encoder_runtimes import runtime_available
    from planner_lm.hardware import cpu_flags, fast_precision
    from planner_lm.run_folder import RunFolder
    from planner_lm.sentence_vectors import nearest_actions, resolve_embed_backend

    unknown = [name for name in args.variants.split(",") if name not in VARIANTS]
    if unknown:
        raise UserError(f"--variants: unknown {', '.join(unknown)}; pick from {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    native_bf16 = fast_precision() != "32-true"

    folder = RunFolder(args.run_dir) if args.run_dir else None
    centroids = None
    if folder is not None and folder.has("prepare"):
        texts = folder.prepared.sentence_texts()
        if folder.has("cluster"):
            centroids = torch.from_numpy(np.asarray(folder.codebook(), dtype=np.float32))
    else:
        folder, texts = None, demo_sentences()
    rng = np.random.default_rng(0)
    texts = [texts[i] for i in rng.choice(len(texts), size=min(args.sentences, len(texts)), replace=False)]
    report.update({
        "sentences": len(texts),
        "source": f"{folder.dir('prepare')}" if folder else "bundled demo corpus",
        "centroids": f"{folder.codebook_path} (k={len(centroids)})" if centroids is not None else None,
        "host": {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "native_bf16": native_bf16,
                 "threads": args.threads, "cuda": torch.cuda.is_available()},
        "reference": "SentenceTransformer.encode(batch_size=256), torch fp32",
    })

    variants, skipped = {}, {}
    for name in args.variants.split(","):
        backend, quantize, precision = VARIANTS[name]
        if backend != "torch" and not runtime_available(backend):
            skipped[name] = f"extra [{backend}] not installed"
        elif name == "openvino-bf16" and not native_bf16:
            skipped[name] = "no native bf16 on this host (OpenVINO would emulate it)"
        else:
            variants[name] = Ours(args.encoder, backend, quantize, precision or fast_precision(), args.batch_size)
    reference = Reference(args.encoder)
    reference(texts[:64])  # warm-up
    for run in variants.values():
        if hasattr(run.model.encoder, "set_precision"):
            run.model.encoder.set_precision(run.precision)
        run.model.embed(texts[:64])  # warm-up: sessions compiled, exports cached

    # Side by side at a fine grain: the reference's own batches (texts sorted by length as `encode`
    # sorts them, 256 a batch) are the unit; every unit is encoded by the reference and then by each
    # variant's stage step (`predict_step` on batches of --batch_size, as Trainer.predict runs it),
    # in a rotating order, so load that comes and goes hits every method alike.
    order = np.argsort([-len(t) for t in texts], kind="stable")
    units = [[texts[i] for i in order[start:start + 256]] for start in range(0, len(order), 256)]
    methods = ["encode", *variants]
    times = {name: np.zeros((args.repeats, len(units))) for name in methods}
    step = 0
    for repeat in range(args.repeats):
        for u, unit in enumerate(units):
            for name in methods[step % len(methods):] + methods[:step % len(methods)]:
                start = time.perf_counter()
                reference.model.encode(unit, batch_size=256, normalize_embeddings=True, show_progress_bar=False) \
                    if name == "encode" else variants[name].step(unit)
                times[name][repeat, u] = time.perf_counter() - start
            step += 1
    ratios = {name: times["encode"].sum(1) / times[name].sum(1) for name in variants}
    results: dict[str, dict] = {}
    for name in variants:
        results[name] = {"sentences_per_s": round(len(texts) / float(np.median(times[name].sum(1))), 1),
                         "speedup_vs_encode": round(float(np.median(ratios[name])), 2),
                         "speedups_per_repeat": [round(float(r), 2) for r in ratios[name]]}
    report.update({
        "reference_sentences_per_s": round(len(texts) / float(np.median(times["encode"].sum(1))), 1),
        "ours": f"SentenceEmbedder.predict_step on length-sorted batches of {args.batch_size} (timed side by side "
                f"with the reference, 256 sentences at a time); fidelity and stage_sentences_per_s from one "
                f"full Trainer.predict + shard writer run each",
        "variants": results, "skipped": skipped, "repeats": args.repeats,
    })
    report.save()

    # The full stage path once per variant (Trainer.predict, shard writer, consolidation): its
    # vectors are the ones whose fidelity is reported.
    vectors: dict[str, np.ndarray] = {"encode": reference(texts)[0]}
    ref_actions = np.array(nearest_actions(torch.from_numpy(vectors["encode"]), centroids)) if centroids is not None else None
    for name in variants:
        vectors[name], stage_seconds = variants[name](texts)
        cosine = (vectors[name] * vectors["encode"]).sum(1)
        entry = results[name]
        entry.update({"stage_sentences_per_s": round(len(texts) / stage_seconds, 1),
                      "compute": getattr(variants[name].model.encoder, "description",
                                         f"torch {variants[name].precision}"),
                      "cosine_to_torch_fp32_mean": round(float(cosine.mean()), 5),
                      "cosine_to_torch_fp32_min": round(float(cosine.min()), 5)})
        if ref_actions is not None:
            kept = np.array(nearest_actions(torch.from_numpy(vectors[name]), centroids)) == ref_actions
            entry["actions_kept"] = round(float(kept.mean()), 4)
        entry["meets_fidelity"] = bool(entry["cosine_to_torch_fp32_mean"] >= MIN_MEAN_COSINE
                                       and entry.get("actions_kept", 1.0) >= MIN_ACTIONS_KEPT)
        report.save()
    auto_backend, auto_int8 = resolve_embed_backend("auto", "cuda" if torch.cuda.is_available() else "cpu")
    passing = [n for n in results if results[n]["meets_fidelity"]]
    chosen = max(passing, key=lambda n: results[n]["speedup_vs_encode"]) if passing else None
    report.update({
        "fidelity_bar": {"cosine_to_torch_fp32_mean": MIN_MEAN_COSINE, "actions_kept": MIN_ACTIONS_KEPT},
        "chosen": chosen,
        "speedup_vs_encode": results[chosen]["speedup_vs_encode"] if chosen else None,
        "auto_backend": auto_backend + ("-int8" if auto_int8 else ""),
    })

if __name__ == "__main__":
    main()
