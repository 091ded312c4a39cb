"""k-means: time to reach scikit-learn's inertia, ours vs scikit-learn `KMeans` (and `faiss.Kmeans`).

For each data set, scikit-learn runs the authors' settings (k-means++ init, n_init 1, max_iter
300, tol 1e-4); its final inertia is the target. Ours runs `KMeansModule` through
`Trainer.fit` with the stage's full-scale configuration, `configs/cluster.yaml` (one k-means iteration per epoch, batches streamed from a
memory-mapped float16 `.npy` file as the stage reads `1_embed/embeddings.npy`) and records,
after every iteration, the wall time and the inertia of the centroids that iteration started
from. "seconds to sklearn inertia" is the wall time (init included) until that inertia is <= the
target; `speedup_vs_sklearn` = scikit-learn's fit time / ours. Ours keeps iterating until the
stage's own stopping rule (or `--iters`), so its final inertia and iteration count are those the
stage would report. Every method runs in its own process (own thread pools, own peak RSS) on the
same float32 values (float16-rounded, as the stage stores embeddings); methods alternate over
`--repeats` rounds and the JSON gives medians plus every round, with CPU seconds next to wall
seconds (a check when other processes load the host). Inertia = sum of squared
distances to the nearest centroid, float64, recomputed the same way for every method.

Data sets (`--datasets`, comma-separated):
- `planted`: `--n` unit vectors (default 100,000 × 384) around `--k` random directions, with
  per-cluster noise scales (noise norm 3-9× the signal: heavily overlapping, like sentence
  embeddings);
- `demo`, `quality`, or any run directory: that run's `1_embed/embeddings.npy`, every sentence
  (`runs/demo`: 10,768 × 384).

    .venv/bin/python bench/bench_kmeans.py                                 # planted + demo, k = 1024
    .venv/bin/python bench/bench_kmeans.py --datasets runs/quality --repeats 1
    .venv/bin/python bench/bench_kmeans.py --datasets planted --n 1000000 --dim 768 --methods ours   # GPU

A run data set must have its embed stage finished (checked first; `--datasets planted` needs no
run). The report grows in `--json` (default bench/out/kmeans.json) after each method's round.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from _common import ROOT, add_json_option, bench_report, require_stages


def planted_data(n: int, dim: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    scales = rng.uniform(0.5, 1.5, size=k).astype(np.float32) / np.sqrt(dim)
    labels = rng.integers(k, size=n)
    x = centres[labels] + rng.standard_normal((n, dim)).astype(np.float32) * scales[labels, None] * 6
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def run_dir_of(name: str) -> Path:
    """The run directory a data set name stands for (`demo` -> runs/demo; a path as given)."""
    return Path(name if os.sep in name else f"runs/{name}")


def load_dataset(name: str, args) -> np.ndarray:
    """float16 [n, d]: what the stage reads (synthetic data is rounded to float16 like embeddings)."""
    if name == "planted":
        return planted_data(args.n, args.dim, args.k, args.seed).astype(np.float16)
    from planner_lm.run_folder import RunFolder

    return np.asarray(RunFolder(run_dir_of(name)).embeddings()).astype(np.float16)


def inertia(x: np.ndarray, centroids: np.ndarray) -> float:
    import torch

    from planner_lm.models.kmeans import torch_assign

    c = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32))
    total = 0.0
    for lo in range(0, len(x), 65536):
        rows = torch.from_numpy(np.asarray(x[lo : lo + 65536], dtype=np.float32))
        total += float(torch_assign(rows, c)[1].double().sum())
    return total


def cpu_seconds() -> float:
    """CPU time of this process, all threads (less sensitive than wall time to other processes' load)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited over fork + exec)."""
    try:
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
        return round(int(line.split()[1]) / 1024, 1)
    except (OSError, StopIteration):
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# ---------------------------------------------------------------- one method, in its own process
def run_sklearn(x: np.ndarray, k: int, seed: int, threads: int) -> dict:
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    x = np.asarray(x, dtype=np.float32)
    with threadpool_limits(threads):
        start = time.perf_counter()
        cpu = cpu_seconds()
        km = KMeans(n_clusters=k, init="k-means++", n_init=1, max_iter=300, tol=1e-4, random_state=seed).fit(x)
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return {"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "iterations": int(km.n_iter_),
            "inertia": inertia(x, km.cluster_centers_), "peak_rss_mb": peak_rss_mb()}


def run_faiss(x: np.ndarray, k: int, seed: int, iters: int, target: float | None) -> dict:
    import faiss

    x = np.asarray(x, dtype=np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, max_points_per_centroid=10**9)
    start = time.perf_counter()
    km.train(x)
    seconds = time.perf_counter() - start
    # faiss records, per iteration, the objective of the assignment step and the cumulative time
    curve = [{"iteration": i + 1, "seconds": round(float(s["time"]), 2), "inertia": float(s["obj"])}
             for i, s in enumerate(km.iteration_stats)]
    reached = next((p["seconds"] for p in curve if target is not None and p["inertia"] <= target), None)
    return {"iterations": iters, "seconds": round(seconds, 2), "inertia": inertia(x, km.centroids),
            "seconds_to_sklearn_inertia": reached, "peak_rss_mb": peak_rss_mb()}


def run_ours(path: str, k: int, seed: int, iters: int, target: float | None, model_kwargs: dict,
             batch_size: int) -> dict:
    import lightning as L
    from torch.utils.data import DataLoader

    from planner_lm.data.embeddings import EmbeddingBatches
    from planner_lm.lit.kmeans import KMeansModule

    class TimedKMeans(KMeansModule):
        """Records (iteration, seconds, inertia of the centroids the iteration started from)."""

        def on_train_epoch_end(self) -> None:
            phase = "hartigan" if self.hartigan_step else "lloyd"
            super().on_train_epoch_end()
            points.append({"iteration": self.iterations, "seconds": round(time.perf_counter() - start, 3),
                           "cpu_seconds": round(cpu_seconds() - cpu, 3), "inertia": round(self.inertia_curve[-1], 2),
                           "rule": phase})

    points: list[dict] = []
    dataset = EmbeddingBatches(path, None, batch_size)  # memory-mapped float16, as in the stage
    start, cpu = time.perf_counter(), cpu_seconds()
    L.seed_everything(seed, verbose=False)
    module = TimedKMeans(num_clusters=k, embedding_dim=dataset.array.shape[1], **model_kwargs)
    trainer = L.Trainer(accelerator="auto", devices=1, max_epochs=iters, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, precision="32-true")
    trainer.fit(module, DataLoader(dataset, batch_size=None))
    seconds = time.perf_counter() - start
    final = inertia(np.load(path, mmap_mode="r"), module.centroids.detach().float().cpu().numpy())
    reached = next((p for p in points if target is not None and p["inertia"] <= target), None)
    return {"backend": module.backend_name, **model_kwargs, "batch_size": batch_size,
            "iterations": module.iterations, "converged": module.converged, "seconds": round(seconds, 2),
            "inertia": final, "seconds_to_sklearn_inertia": reached and reached["seconds"],
            "cpu_seconds_to_sklearn_inertia": reached and reached["cpu_seconds"],
            "iterations_to_sklearn_inertia": reached and reached["iteration"], "peak_rss_mb": peak_rss_mb(),
            "curve": points}


def worker(args) -> None:
    """`--worker METHOD`: run one method on `--data_file`, print its JSON (last line of stdout)."""
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    x = np.load(args.data_file, mmap_mode="r")
    if args.worker == "sklearn":
        out = run_sklearn(x, args.k, args.seed, args.threads)
    elif args.worker == "faiss":
        import faiss

        faiss.omp_set_num_threads(args.threads)
        out = run_faiss(x, args.k, args.seed, args.faiss_iters, args.target)
    else:
        kwargs = {"init": args.init, "init_sample_size": args.init_sample, "backend": args.backend,
                  "tolerance": args.tolerance, "algorithm": args.algorithm}
        out = run_ours(args.data_file, args.k, args.seed, args.iters, args.target, kwargs, args.batch_size)
    print(json.dumps(out))


def spawn(method: str, data_file: str, args, target: float | None) -> dict:
    command = [sys.executable, __file__, "--worker", method, "--data_file", data_file]
    for name in ("k", "seed", "threads", "faiss_iters", "iters", "backend", "init", "init_sample", "batch_size",
                 "tolerance", "algorithm"):
        command += [f"--{name}", str(getattr(args, name))]
    if target is not None:
        command += ["--target", repr(target)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               OPENBLAS_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps({"method": method, **{k: v for k, v in out.items() if k != "curve"}}), file=sys.stderr, flush=True)
    return out


def bench_dataset(name: str, args, report) -> dict:
    """One data set's figures; `report` is saved after every method's round (its partial rounds
    sit under "datasets" until the medians replace them)."""
    x = load_dataset(name, args)
    methods = [m for m in args.methods.split(",") if m]
    result: dict = {"data": name, "n": int(x.shape[0]), "dim": int(x.shape[1]), "k": args.k,
                    "data_mb_float32": round(x.shape[0] * x.shape[1] * 4 / 2**20, 1)}
    rounds: dict[str, list[dict]] = {m: [] for m in methods}
    report["datasets"].append({**result, "rounds_so_far": rounds})
    with tempfile.TemporaryDirectory() as tmp:
        data_file = os.path.join(tmp, "x.npy")
        np.save(data_file, x)
        target = args.target
        for _ in range(args.repeats):
            if "sklearn" in methods:  # same seed every round: the same target, a fresh timing
                rounds["sklearn"].append(spawn("sklearn", data_file, args, None))
                target = args.target if args.target is not None else rounds["sklearn"][0]["inertia"]
                report.save()
            for method in methods:
                if method != "sklearn":
                    rounds[method].append(spawn(method, data_file, args, target))
                    report.save()
    report["datasets"].pop()
    result["target_inertia"] = target

    def median(values):
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 2) if values else None

    for method, runs in rounds.items():
        summary = {key: median([r[key] for r in runs]) for key in (
            "seconds", "cpu_seconds", "seconds_to_sklearn_inertia", "cpu_seconds_to_sklearn_inertia", "peak_rss_mb")
            if key in runs[0]}
        summary["rounds"] = runs
        result[method] = summary
    if "sklearn" in rounds and "ours" in rounds:
        ratios = [s["seconds"] / o["seconds_to_sklearn_inertia"] if o["seconds_to_sklearn_inertia"] else 0.0
                  for s, o in zip(rounds["sklearn"], rounds["ours"])]
        result["speedup_vs_sklearn"] = round(statistics.median(ratios), 2)
        result["speedup_vs_sklearn_rounds"] = [round(r, 2) for r in ratios]
        result["ours_reached_sklearn_inertia"] = all(o["seconds_to_sklearn_inertia"] for o in rounds["ours"])
        # CPU-time ratio: a check on the wall-time one when other processes load the host
        cpu_ratios = [s["cpu_seconds"] / o["cpu_seconds_to_sklearn_inertia"] if o["cpu_seconds_to_sklearn_inertia"]
                      else 0.0 for s, o in zip(rounds["sklearn"], rounds["ours"])]
        result["cpu_time_speedup_vs_sklearn"] = round(statistics.median(cpu_ratios), 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="planted,demo", help="comma-separated: planted, demo, quality, a run dir")
    parser.add_argument("--n", type=int, default=100_000, help="points (planted)")
    parser.add_argument("--dim", type=int, default=384, help="dimension (planted)")
    parser.add_argument("--k", type=int, default=1024, help="clusters")
    parser.add_argument("--seed", type=int, default=42, help="seed of data and of every method")
    parser.add_argument("--methods", default="sklearn,ours", help="comma-separated: sklearn, ours, faiss")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (methods alternate); medians are reported")
    parser.add_argument("--target", type=float, default=None, help="inertia to reach (default: scikit-learn's)")
    parser.add_argument("--faiss_iters", type=int, default=100, help="faiss iterations")
    # ours: the full-scale stage configuration (configs/cluster.yaml) unless overridden
    import yaml

    stage = yaml.safe_load((ROOT / "configs" / "cluster.yaml").read_text())
    model, data, trainer = stage["model"], stage["data"], stage["trainer"]
    parser.add_argument("--iters", type=int, default=trainer["max_epochs"], help="ours: max iterations")
    parser.add_argument("--algorithm", default=model["algorithm"], help="ours: hartigan or lloyd")
    parser.add_argument("--tolerance", type=float, default=model["tolerance"], help="ours: stopping tolerance")
    parser.add_argument("--backend", default=model["backend"], help="ours: assignment backend auto, torch, faiss")
    parser.add_argument("--init", default=model["init"], help="ours: kmeans++ or random")
    parser.add_argument("--init_sample", type=int, default=model["init_sample_size"], help="ours: init sample size")
    parser.add_argument("--batch_size", type=int, default=data["batch_size"], help="ours: rows per k-means step")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for every method")
    add_json_option(parser, "kmeans")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data_file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    from planner_lm.hardware import cpu_flags

    names = [name for name in args.datasets.split(",") if name]
    with bench_report("kmeans", args.json, cpu_flags=cpu_flags(), cpu_threads=args.threads, cores=os.cpu_count(),
                      load_average_at_start=[round(v, 2) for v in os.getloadavg()], repeats=args.repeats,
                      datasets=[]) as result:
        for name in names:  # every run named must have its embeddings before any timing starts
            if name != "planted":
                require_stages(run_dir_of(name), ["embed"], option=f"--datasets {name}", instead="--datasets planted")
        import torch

        result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        for name in names:
            result["datasets"].append(bench_dataset(name, args, result))
            result.save()
        result["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
        speedups = [d.get("speedup_vs_sklearn") for d in result["datasets"]]
        # the headline figure: the worst data set's median speedup
        result["speedup_vs_sklearn"] = min(speedups) if speedups and None not in speedups else None


if __name__ == "__main__":
    main()
