"""k-means: time to reach scikit-learn's inertia, ours vs scikit-learn `KMeans` and `faiss.Kmeans`.

Same data for all three (n × d float32, unit norm), same k. scikit-learn runs the authors'
settings (k-means++ init, n_init 1, max_iter 300, tol 1e-4); faiss.Kmeans runs `--faiss_iters`
iterations (default 100) with subsampling off, and its per-iteration statistics give the curve; ours runs our LightningModule through `Trainer.fit` (one Lloyd iteration per epoch) and
records, after every iteration, the time and the inertia. "time to sklearn inertia" is the wall
time (init included) until a method's inertia is <= scikit-learn's final inertia. Every inertia is
recomputed the same way (sum of squared distances to the nearest centroid, float64).

Data (`--data`): `planted` = unit vectors around `k` random directions with per-cluster noise
scales; `demo` = the run's MiniLM embeddings (`--run_dir`) tiled with Gaussian noise to `--n`
rows and renormalised.

    .venv/bin/python bench/bench_kmeans.py --n 100000 --dim 384 --k 1024 --data demo --run_dir runs/demo
    .venv/bin/python bench/bench_kmeans.py --n 1000000 --dim 768 --k 1024 --skip sklearn,faiss   # GPU
"""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import numpy as np
import torch


def planted_data(n: int, dim: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    scales = rng.uniform(0.5, 1.5, size=k).astype(np.float32) / np.sqrt(dim)
    labels = rng.integers(k, size=n)
    x = centres[labels] + rng.standard_normal((n, dim)).astype(np.float32) * scales[labels, None] * 6
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def demo_data(run_dir: str, n: int, seed: int) -> np.ndarray:
    base = np.load(os.path.join(run_dir, "1_embed", "embeddings.npy")).astype(np.float32)
    rng = np.random.default_rng(seed)
    rows = base[rng.integers(len(base), size=n)]
    rows += rng.standard_normal(rows.shape).astype(np.float32) * (0.1 / np.sqrt(base.shape[1]))  # noise norm ~0.1
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def inertia(x: np.ndarray, centroids: np.ndarray) -> float:
    from planner_lm.models.kmeans import torch_assign

    device = "cuda" if torch.cuda.is_available() else "cpu"
    xt = torch.from_numpy(x).to(device)
    total = 0.0
    c = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(device)
    for lo in range(0, len(x), 65536):
        total += float(torch_assign(xt[lo : lo + 65536], c)[1].double().sum())
    return total


def run_sklearn(x: np.ndarray, k: int, seed: int) -> dict:
    from sklearn.cluster import KMeans

    start = time.perf_counter()
    km = KMeans(n_clusters=k, init="k-means++", n_init=1, max_iter=300, tol=1e-4, random_state=seed).fit(x)
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 2), "iterations": int(km.n_iter_), "inertia": inertia(x, km.cluster_centers_)}


def run_faiss(x: np.ndarray, k: int, seed: int, iters: int, target: float | None) -> dict:
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, max_points_per_centroid=10**9,
                      gpu=torch.cuda.is_available())
    start = time.perf_counter()
    km.train(x)
    seconds = time.perf_counter() - start
    # faiss records, per iteration, the objective of the assignment step and the cumulative time
    curve = [{"iteration": i + 1, "seconds": round(float(s["time"]), 2), "inertia": float(s["obj"])}
             for i, s in enumerate(km.iteration_stats)]
    reached = next((p["seconds"] for p in curve if target is not None and p["inertia"] <= target), None)
    return {"iterations": iters, "seconds": round(seconds, 2), "inertia": inertia(x, km.centroids),
            "seconds_to_sklearn_inertia": reached, "curve": curve[:: max(1, len(curve) // 20)]}


def run_ours(x: np.ndarray, k: int, seed: int, iters: int, backend: str, init: str, init_sample: int,
             batch_size: int, target: float | None) -> dict:
    import lightning as L
    from torch.utils.data import DataLoader

    from planner_lm.data.embeddings import EmbeddingBatches
    from planner_lm.lit.kmeans import KMeansModule

    class TimedKMeans(KMeansModule):
        """Records (iteration, seconds, inertia) after each Lloyd update; stops at the target."""

        def on_train_epoch_end(self) -> None:
            super().on_train_epoch_end()
            points.append({"iteration": self.iterations, "seconds": round(time.perf_counter() - start, 2),
                           "inertia": self.inertia_curve[-1]})
            # the inertia of the centroids this epoch started with: reached at the latest now
            if target is not None and self.inertia_curve[-1] <= target:
                self.trainer.should_stop = True

    points: list[dict] = []
    start = time.perf_counter()
    L.seed_everything(seed, verbose=False)
    module = TimedKMeans(num_clusters=k, embedding_dim=x.shape[1], init=init, init_sample_size=init_sample,
                         backend=backend, tolerance=0.0)
    trainer = L.Trainer(accelerator="auto", devices=1, max_epochs=iters, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(EmbeddingBatches(x.astype(np.float16), None, batch_size), batch_size=None))
    final = inertia(x, module.centroids.detach().float().cpu().numpy())
    reached = next((p["seconds"] for p in points if target is not None and p["inertia"] <= target), None)
    return {"backend": module.backend_name, "init": init, "init_sample_size": init_sample,
            "iterations": module.iterations, "seconds": points[-1]["seconds"] if points else None,
            "inertia": final, "seconds_to_sklearn_inertia": reached,
            "curve": points[:: max(1, len(points) // 20)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="points")
    parser.add_argument("--dim", type=int, default=384, help="dimension (planted data only)")
    parser.add_argument("--k", type=int, default=1024, help="clusters")
    parser.add_argument("--data", choices=["planted", "demo"], default="planted", help="data source (see above)")
    parser.add_argument("--run_dir", default="runs/demo", help="run directory with 1_embed (for --data demo)")
    parser.add_argument("--seed", type=int, default=42, help="seed of data and of every method")
    parser.add_argument("--skip", default="", help="comma-separated methods to skip: sklearn,faiss,ours")
    parser.add_argument("--target", type=float, default=None, help="inertia to reach (default: scikit-learn's)")
    parser.add_argument("--faiss_iters", type=int, default=100, help="longest faiss run")
    parser.add_argument("--iters", type=int, default=300, help="max Lloyd iterations for ours")
    parser.add_argument("--backend", default="auto", help="our assignment backend: auto, torch, faiss")
    parser.add_argument("--init", default="kmeans++", help="our init: kmeans++ or random")
    parser.add_argument("--init_sample", type=int, default=16384, help="our init sample size")
    parser.add_argument("--batch_size", type=int, default=65536, help="our rows per k-means step")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for every method")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    warnings.filterwarnings("ignore")
    skip = set(filter(None, args.skip.split(",")))
    x = planted_data(args.n, args.dim, args.k, args.seed) if args.data == "planted" else demo_data(args.run_dir, args.n, args.seed)
    result: dict = {"n": len(x), "dim": x.shape[1], "k": args.k, "data": args.data, "threads": args.threads,
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    target = args.target
    if "sklearn" not in skip:
        result["sklearn"] = run_sklearn(x, args.k, args.seed)
        target = target if target is not None else result["sklearn"]["inertia"]
    result["target_inertia"] = target
    if "ours" not in skip:
        result["ours"] = run_ours(x, args.k, args.seed, args.iters, args.backend, args.init, args.init_sample,
                                  args.batch_size, target)
    if "faiss" not in skip:
        try:
            result["faiss"] = run_faiss(x, args.k, args.seed, args.faiss_iters, target)
        except ImportError:
            result["faiss"] = "not installed"
    if "sklearn" in result and "ours" in result and result["ours"]["seconds_to_sklearn_inertia"]:
        result["speedup_vs_sklearn"] = round(result["sklearn"]["seconds"] / result["ours"]["seconds_to_sklearn_inertia"], 2)
    if isinstance(result.get("faiss"), dict) and result["faiss"]["seconds_to_sklearn_inertia"] and "ours" in result \
            and result["ours"]["seconds_to_sklearn_inertia"]:
        result["speedup_vs_faiss"] = round(result["faiss"]["seconds_to_sklearn_inertia"] / result["ours"]["seconds_to_sklearn_inertia"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
