"""Embedding throughput: our predict loop vs plain `SentenceTransformer.encode(batch_size=256)`.

Both encode the same sentences (a seeded sample of a prepared corpus, or of the bundled demo
corpus when no run directory is given) with the same encoder, in one process, alternating runs
so background load hits both alike. Prints JSON: sentences/s of each, the speed-up, and the
cosine similarity of our vectors to the fp32 reference.

    .venv/bin/python bench/bench_embed.py --sentences 2048 --repeats 2
    .venv/bin/python bench/bench_embed.py --run_dir runs/demo --encoder all-MiniLM-L6-v2
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def demo_sentences() -> list[str]:
    from planner_lm.corpus import CorpusConfig, iter_documents
    from planner_lm.sentences import sentence_spans

    texts = []
    for doc in iter_documents(CorpusConfig(name="demo")):
        texts.extend(doc.text[a:b] for a, b in sentence_spans(doc.text))
        if len(texts) > 40_000:
            break
    return texts


def ours(texts: list[str], encoder: str, batch_size: int, precision: str, devices: int | str) -> tuple[np.ndarray, float]:
    """Our stage's path: SentenceEmbedder + length-sorted SentenceBatches + ShardWriter, via Trainer.predict."""
    import lightning as L
    from torch.utils.data import DataLoader

    from planner_lm.data.embed_data import EmbedPlan, SentenceBatches, length_sorted_batches
    from planner_lm.lit.embed import SentenceEmbedder, ShardWriter, consolidate_shards

    model = SentenceEmbedder(encoder=encoder)
    lengths = np.array([len(t) for t in texts])
    plan = EmbedPlan(length_sorted_batches(lengths, batch_size), shard_batches=16)
    with tempfile.TemporaryDirectory() as tmp:
        shard_dir = os.path.join(tmp, "shards")
        loader = DataLoader(SentenceBatches(texts, plan, list(range(plan.num_shards))), batch_size=None,
                            collate_fn=lambda item: item)
        trainer = L.Trainer(accelerator="auto", devices=devices, precision=precision, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[ShardWriter(shard_dir)])
        start = time.perf_counter()
        trainer.predict(model, dataloaders=loader, return_predictions=False)
        out = os.path.join(tmp, "embeddings.npy")
        consolidate_shards(Path(shard_dir), plan, len(texts), Path(out))
        seconds = time.perf_counter() - start
        return np.load(out).astype(np.float32), seconds


def reference(texts: list[str], encoder: str) -> tuple[np.ndarray, float]:
    from sentence_transformers import SentenceTransformer

    from planner_lm.sentence_vectors import resolve_encoder_path

    model = SentenceTransformer(resolve_encoder_path(encoder), device="cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    vectors = model.encode(texts, batch_size=256, normalize_embeddings=True, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", default=None, help="take sentences from this run's 0_prepare (default: demo corpus)")
    parser.add_argument("--encoder", default="all-MiniLM-L6-v2", help="encoder name or folder")
    parser.add_argument("--sentences", type=int, default=2048, help="seeded sample size")
    parser.add_argument("--batch_size", type=int, default=128, help="our batch size")
    parser.add_argument("--precision", default="bf16-mixed", help="our Trainer precision")
    parser.add_argument("--devices", default="auto", help="Trainer devices for our run")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the best time counts")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.run_dir:
        from planner_lm.run_folder import RunFolder

        texts = RunFolder(args.run_dir).prepared.sentence_texts()
    else:
        texts = demo_sentences()
    rng = np.random.default_rng(0)
    texts = [texts[i] for i in rng.choice(len(texts), size=min(args.sentences, len(texts)), replace=False)]
    best_ours, best_ref = float("inf"), float("inf")
    for _ in range(args.repeats):
        ref_vectors, seconds = reference(texts, args.encoder)
        best_ref = min(best_ref, seconds)
        our_vectors, seconds = ours(texts, args.encoder, args.batch_size, args.precision, args.devices)
        best_ours = min(best_ours, seconds)
    cosine = (our_vectors * ref_vectors).sum(1)
    print(json.dumps({
        "encoder": args.encoder,
        "sentences": len(texts),
        "device": "cuda" if torch.cuda.is_available() else f"cpu x{args.threads} threads",
        "reference": "SentenceTransformer.encode(batch_size=256), fp32",
        "ours": f"Trainer.predict, length-sorted batches of {args.batch_size}, {args.precision}, shard writer",
        "reference_sentences_per_s": round(len(texts) / best_ref, 1),
        "ours_sentences_per_s": round(len(texts) / best_ours, 1),
        "speedup": round(best_ref / best_ours, 2),
        "cosine_to_reference_min": round(float(cosine.min()), 6),
        "cosine_to_reference_mean": round(float(cosine.mean()), 6),
        "repeats": args.repeats,
    }, indent=2))


if __name__ == "__main__":
    main()
