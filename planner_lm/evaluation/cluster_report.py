"""Cluster report of the `cluster` stage: are the writing actions usable?

A good codebook has no dead clusters, no giant catch-all cluster, a high action entropy (the
planner has something to predict) and clusters whose example sentences share a visible function.
`write_cluster_report` writes `report/report.json`, `report/examples.txt`,
`report/cluster_sizes.png` and `report/inertia.png`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from planner_lm.artifacts import atomic_write_text

# A cluster is "giant" when it holds more than this many times the mean cluster size.
GIANT_FACTOR = 5.0


def cluster_size_stats(sizes: np.ndarray) -> dict[str, Any]:
    """Size statistics and the entropy of the action distribution (natural log and normalised)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    k, total = len(sizes), int(sizes.sum())
    mean = total / k if k else 0.0
    p = sizes[sizes > 0] / max(total, 1)
    entropy = float(-(p * np.log(p)).sum()) if total else 0.0
    return {
        "num_clusters": k,
        "num_points": total,
        "min": int(sizes.min()) if k else 0,
        "max": int(sizes.max()) if k else 0,
        "mean": round(mean, 3),
        "median": float(np.median(sizes)) if k else 0.0,
        "dead": int((sizes == 0).sum()),
        "giant": int((sizes > GIANT_FACTOR * mean).sum()) if k else 0,
        "giant_factor": GIANT_FACTOR,
        "largest_share": round(float(sizes.max()) / max(total, 1), 5) if k else 0.0,
        "entropy_nats": round(entropy, 5),
        "entropy_normalized": round(entropy / math.log(k), 5) if k > 1 else 0.0,
        "perplexity": round(math.exp(entropy), 3),
    }


def nearest_members(
    actions: np.ndarray, distances: np.ndarray, k: int, per_cluster: int
) -> list[np.ndarray]:
    """For every cluster, the indices of its `per_cluster` members closest to the centroid."""
    order = np.lexsort((distances, actions))  # by action, then by distance
    bounds = np.searchsorted(actions[order], np.arange(k + 1))
    return [order[bounds[c] : min(bounds[c + 1], bounds[c] + per_cluster)] for c in range(k)]


def format_examples(
    sizes: np.ndarray, members: Sequence[np.ndarray], text_of: Callable[[np.ndarray], list[str]],
    max_clusters: int | None = None, max_chars: int = 200,
) -> str:
    """Example sentences per cluster, largest clusters first."""
    k = len(sizes)
    order = np.argsort(-np.asarray(sizes), kind="stable")
    if max_clusters is not None:
        order = order[:max_clusters]
    lines = [f"# {k} clusters, largest first; examples are the members nearest to each centroid", ""]
    for cluster in order:
        lines.append(f"## action {int(cluster)}  ({int(sizes[cluster])} sentences)")
        for text in text_of(members[cluster]):
            text = " ".join(text.split())
            lines.append("  - " + (text if len(text) <= max_chars else text[: max_chars - 1] + "…"))
        lines.append("")
    return "\n".join(lines)


def plot_sizes(sizes: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ranked, hist) = plt.subplots(1, 2, figsize=(11, 4))
    ranked.plot(np.sort(sizes)[::-1], lw=1.2)
    ranked.axhline(np.mean(sizes), color="gray", ls="--", lw=0.8, label="mean")
    ranked.set(title="cluster sizes, largest first", xlabel="rank", ylabel="sentences")
    ranked.set_yscale("log" if sizes.min() > 0 else "symlog")
    ranked.legend()
    hist.hist(sizes, bins=min(50, max(10, len(sizes) // 10)), color="tab:blue", alpha=0.85)
    hist.set(title="cluster-size histogram", xlabel="sentences in cluster", ylabel="clusters")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_inertia(curve: Sequence[float], final: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    values = list(curve) + ([final] if final is not None else [])
    ax.plot(range(len(values)), values, marker="o", ms=3, lw=1.2)
    ax.set(title="k-means inertia per Lloyd iteration", xlabel="iteration (0 = initial centroids)",
           ylabel="sum of squared distances (fit set)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_cluster_report(
    report_dir: str | Path,
    train_actions: np.ndarray,
    train_distances: np.ndarray,
    k: int,
    inertia_curve: Sequence[float],
    final_inertia: float | None,
    text_of: Callable[[np.ndarray], list[str]],
    examples_per_cluster: int = 5,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the report files; return the statistics (also stored in report.json).

    Args:
        train_actions / train_distances: action id and squared distance to its centroid of
            every training sentence (row i = training sentence i).
        inertia_curve: inertia at the start of each Lloyd iteration (fit set).
        final_inertia: inertia of the final centroids on the fit set, if known.
        text_of: maps training-sentence indices to their text (for examples.txt).
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    sizes = np.bincount(train_actions, minlength=k)
    stats = cluster_size_stats(sizes)
    members = nearest_members(train_actions, train_distances, k, examples_per_cluster)
    atomic_write_text(report_dir / "examples.txt", format_examples(sizes, members, text_of))
    plot_sizes(sizes, report_dir / "cluster_sizes.png")
    plot_inertia(inertia_curve, final_inertia, report_dir / "inertia.png")
    report = {
        "train_cluster_sizes": stats,
        "inertia_curve": [float(v) for v in inertia_curve],
        "final_inertia": final_inertia,
        "mean_squared_distance": float(np.mean(train_distances)) if len(train_distances) else None,
        **(extra or {}),
        "sizes": sizes.tolist(),
    }
    atomic_write_text(report_dir / "report.json", json.dumps(report, indent=2) + "\n")
    return report


def format_summary(stats: dict[str, Any]) -> str:
    """One screen of the most telling numbers."""
    return (
        f"{stats['num_clusters']} actions over {stats['num_points']:,} training sentences: "
        f"sizes min {stats['min']} / median {stats['median']:.0f} / max {stats['max']}, "
        f"{stats['dead']} dead, {stats['giant']} giant (> {stats['giant_factor']:.0f}× mean), "
        f"entropy {stats['entropy_normalized']:.3f} of the maximum (perplexity {stats['perplexity']:.1f})"
    )
