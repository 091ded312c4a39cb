"""Plain-torch building blocks of k-means: initialisation, assignment (Lloyd's nearest-centroid
rule or Hartigan's size-weighted rule), centroid update.

The Lightning module in `planner_lm.lit.kmeans` strings these together so that one epoch is one
iteration, which lets Lightning strategies spread the assignment over processes. Nothing here
keeps the data set in memory: each function sees one batch (or the init sample) at a time.

Assignment backends (`make_assigner`):
- ``"torch"``: a chunked matmul on the tensors' own device; works everywhere (CPU, CUDA, MPS).
- ``"faiss"``: a flat L2 index from FAISS; on a CUDA tensor it uses a GPU index when the
  installed faiss has GPU support, otherwise the CPU index.
- ``"auto"``: faiss when it can serve the device the data lives on, torch otherwise.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import numpy as np
import torch

AssignmentBackend = Literal["auto", "torch", "faiss"]
InitMethod = Literal["kmeans++", "random"]

# An assigner maps (batch [n, d], centroids [k, d]) to (nearest centroid ids [n], squared distances [n]).
Assigner = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# Relative size of the perturbation that pulls the two halves of a split cluster apart
# (the value FAISS uses when it re-seeds empty clusters).
SPLIT_EPSILON = 1.0 / 1024


def squared_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [n, k] through one matmul (||x||² - 2 x·c + ||c||²), clamped at 0."""
    x_sq = (x * x).sum(dim=1, keepdim=True)
    c_sq = (centroids * centroids).sum(dim=1)
    distances = torch.addmm(c_sq.unsqueeze(0), x, centroids.T, alpha=-2.0)
    return (distances + x_sq).clamp_min_(0.0)


def torch_assign(
    x: torch.Tensor, centroids: torch.Tensor, rows_per_chunk: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid by matmul, in row chunks so the [chunk, k] score block stays small.

    The argmin is taken over ||c||² - 2 x·c (one fused addmm); ||x||² is added to the [n] minima
    only, which saves two passes over the block compared with full distances.
    """
    c_sq = (centroids * centroids).sum(dim=1).unsqueeze(0)
    ids = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    best = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], rows_per_chunk):
        rows = x[start : start + rows_per_chunk]
        values, indices = torch.addmm(c_sq, rows, centroids.T, alpha=-2.0).min(dim=1)
        best[start : start + rows_per_chunk] = values + (rows * rows).sum(dim=1)
        ids[start : start + rows_per_chunk] = indices
    return ids, best.clamp_min_(0.0)


def faiss_available() -> bool:
    """True when the `faiss` module can be imported (faiss-cpu or faiss-gpu)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def faiss_has_gpu() -> bool:
    """True when the installed faiss was built with GPU support and sees at least one GPU."""
    if not faiss_available():
        return False
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class FaissAssigner:
    """Nearest centroid through a FAISS flat L2 index, rebuilt whenever the centroids change.

    CPU tensors go through `faiss.IndexFlatL2`; CUDA tensors through `GpuIndexFlatL2` on the
    tensor's device (requires a GPU build of faiss). Results come back on the input's device.
    """

    def __init__(self) -> None:
        import faiss

        self._faiss = faiss
        self._gpu_resources = None
        self._index = None
        self._indexed_version: tuple[int, int, torch.device] | None = None

    def _index_for(self, centroids: torch.Tensor):
        # Rebuild only when the centroid tensor changed (new data pointer or in-place update).
        version = (centroids.data_ptr(), centroids._version, centroids.device)
        if self._index is not None and version == self._indexed_version:
            return self._index
        faiss = self._faiss
        dim = centroids.shape[1]
        if centroids.is_cuda:
            if not hasattr(faiss, "StandardGpuResources"):
                raise RuntimeError("this faiss build has no GPU support; use the torch backend on CUDA")
            if self._gpu_resources is None:
                self._gpu_resources = faiss.StandardGpuResources()
            config = faiss.GpuIndexFlatConfig()
            config.device = centroids.device.index or 0
            index = faiss.GpuIndexFlatL2(self._gpu_resources, dim, config)
        else:
            index = faiss.IndexFlatL2(dim)
        index.add(centroids.detach().float().contiguous().cpu().numpy())
        self._index = index
        self._indexed_version = version
        return index

    def __call__(self, x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = self._index_for(centroids)
        queries = x.detach().float().contiguous()
        if queries.is_cuda:
            import faiss.contrib.torch_utils  # noqa: F401  (lets GPU indexes take torch tensors)

            distances, ids = index.search(queries, 1)
            return ids[:, 0].long(), distances[:, 0].clamp_min(0.0)
        distances, ids = index.search(queries.numpy(), 1)
        return (
            torch.from_numpy(ids[:, 0]).long(),
            torch.from_numpy(distances[:, 0]).clamp_min_(0.0),
        )


def resolve_backend(backend: AssignmentBackend, device: torch.device) -> Literal["torch", "faiss"]:
    """Pick a concrete backend for data on `device`; explain when a requested one cannot work."""
    if backend == "torch":
        return "torch"
    on_cuda = device.type == "cuda"
    usable_faiss = faiss_has_gpu() if on_cuda else (device.type == "cpu" and faiss_available())
    if backend == "faiss":
        if not usable_faiss:
            where = "a GPU build of faiss (faiss-gpu)" if on_cuda else "faiss on a CPU device"
            raise ValueError(f"assignment backend 'faiss' needs {where}; use backend 'torch' or 'auto'")
        return "faiss"
    if backend == "auto":
        return "faiss" if usable_faiss else "torch"
    raise ValueError(f"unknown assignment backend {backend!r}; choose auto, torch or faiss")


def make_assigner(backend: AssignmentBackend, device: torch.device) -> Assigner:
    """Return the assignment function for data on `device` (see module docstring)."""
    if resolve_backend(backend, device) == "faiss":
        return FaissAssigner()
    return torch_assign


def random_init(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct rows of `x` drawn uniformly (what FAISS does by default)."""
    rows = torch.randperm(x.shape[0], generator=generator, device="cpu")[:k].to(x.device)
    return x[rows].clone()


# Up to this many rows the k-means++ seeding precomputes the sample's n × n squared distances
# (n² floats: 512 MiB here); above it, each step computes its candidates' distances by a matmul.
PAIRWISE_MAX_ROWS = 11585


def _plusplus_steps_numpy(pairwise: np.ndarray, first: int, uniforms: np.ndarray, steps) -> np.ndarray:
    """The greedy k-means++ steps on a precomputed [n, n] squared-distance array (see below)."""
    n = pairwise.shape[0]
    chosen = np.empty(len(uniforms) + 1, dtype=np.int64)
    chosen[0] = first
    closest = pairwise[first].copy()
    for c in steps:
        cumulative = np.cumsum(closest, dtype=np.float64)
        candidates = np.minimum(np.searchsorted(cumulative, uniforms[c - 1] * cumulative[-1]), n - 1)
        updated = np.minimum(pairwise[candidates], closest)  # [trials, n]
        best = int(np.argmin(updated.sum(axis=1)))
        chosen[c] = candidates[best]
        closest = updated[best]
    return chosen


def kmeans_plusplus_init(
    x: torch.Tensor,
    k: int,
    generator: torch.Generator,
    local_trials: int | None = None,
    show_progress: bool = False,
) -> torch.Tensor:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii; greedy variant as in scikit-learn).

    Each new centre is the best of `local_trials` candidates sampled proportionally to the squared
    distance to the closest centre chosen so far (default 2 + ln k). On up to `PAIRWISE_MAX_ROWS`
    rows the sample's pairwise squared distances come from one matmul (n² · d, at full BLAS speed)
    and a step only reads `local_trials` rows of them, O(trials · n); larger inputs cost
    O(trials · n · d) per step. The k sequential steps are small operations, run in numpy on CPU
    (a fraction of torch's per-call overhead). The draws come from `generator` up front, so the
    result depends only on it. Call it on a sample: a few rows per cluster are enough before
    Hartigan iterations (`hartigan_assign`).
    """
    n = x.shape[0]
    if k > n:
        raise ValueError(f"cannot pick {k} initial centres from {n} points")
    trials = local_trials if local_trials is not None else 2 + int(math.log(k))
    x_sq = (x * x).sum(dim=1)
    pairwise = None
    if n <= PAIRWISE_MAX_ROWS:
        pairwise = torch.addmm(x_sq.unsqueeze(0), x, x.T, alpha=-2.0).add_(x_sq.unsqueeze(1)).clamp_min_(0.0)

    def distances_to(rows: torch.Tensor) -> torch.Tensor:  # [len(rows), n] squared distances
        if pairwise is not None:
            return pairwise.index_select(0, rows)
        return torch.addmm(x_sq.unsqueeze(0), x[rows], x.T, alpha=-2.0).add_(x_sq[rows].unsqueeze(1)).clamp_min_(0.0)

    first = int(torch.randint(n, (1,), generator=generator))
    uniforms = torch.rand(max(k - 1, 0), trials, generator=generator, dtype=torch.float64)
    steps = range(1, k)
    if show_progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="k-means++ init", unit="centre", leave=False)
    if pairwise is not None and x.device.type == "cpu":
        # k sequential steps of a few small array operations: numpy's per-call overhead is a
        # fraction of torch's (and it never wakes a second thread for arrays this small)
        chosen = _plusplus_steps_numpy(pairwise.numpy(), first, uniforms.numpy(), steps)
        return x[torch.from_numpy(chosen)].clone()
    chosen = torch.empty(k, dtype=torch.long, device=x.device)
    chosen[0] = first
    closest = distances_to(torch.tensor([first], device=x.device))[0]
    uniforms = uniforms.to(x.device)
    for c in steps:
        # Sample candidates in proportion to D(x)²; the cumulative sum in float64 keeps the
        # tail resolvable when n is large.
        cumulative = torch.cumsum(closest, dim=0, dtype=torch.float64)
        candidates = torch.searchsorted(cumulative, uniforms[c - 1] * cumulative[-1]).clamp_max_(n - 1)
        updated = torch.minimum(distances_to(candidates), closest.unsqueeze(0))  # [trials, n]
        best = int(torch.argmin(updated.sum(dim=1)))
        chosen[c] = candidates[best]
        closest = updated[best]
    return x[chosen].clone()


def initial_centroids(
    sample: torch.Tensor, k: int, method: InitMethod, seed: int, show_progress: bool = False
) -> torch.Tensor:
    """Initial centroids [k, d] float32 from an init sample, reproducible from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    sample = sample.float()
    if method == "kmeans++":
        return kmeans_plusplus_init(sample, k, generator, show_progress=show_progress)
    if method == "random":
        return random_init(sample, k, generator)
    raise ValueError(f"unknown init method {method!r}; choose kmeans++ or random")


def accumulate(
    x: torch.Tensor, ids: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor
) -> None:
    """Add a batch's per-centroid coordinate sums and member counts into `sums` [k, d] and `counts` [k].

    The batch is summed in its own dtype (float32: cheap, exact enough for one batch) and only the
    [k, d] result is added into the (float64) running sums, which keeps long epochs accurate.
    """
    batch_sums = torch.zeros(sums.shape, dtype=x.dtype, device=x.device).index_add_(0, ids, x)
    sums += batch_sums.to(sums.dtype)
    counts += torch.bincount(ids, minlength=counts.shape[0]).to(counts.dtype)


def lloyd_update(
    sums: torch.Tensor, counts: torch.Tensor, previous: torch.Tensor
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """New centroids (float32 [k, d]) = member means; empty clusters re-seeded by splitting.

    An empty cluster takes over half of the currently largest cluster: both get that cluster's
    mean, nudged in opposite directions by ``SPLIT_EPSILON`` so the next assignment separates
    them. Returns the centroids, the number of clusters re-seeded, and the cluster sizes (float64
    [k], the counts with each split cluster's members shared between its two halves: what
    `hartigan_assign` weighs the next assignment with). Deterministic given the (all-reduced)
    inputs, so every rank computes the same result.
    """
    counts = counts.to(torch.float64).clone()
    centroids = previous.to(torch.float64).clone()
    filled = counts > 0
    centroids[filled] = sums[filled].to(torch.float64) / counts[filled].unsqueeze(1)
    empty = torch.nonzero(~filled).flatten().tolist()
    if empty and not bool(filled.any()):
        raise ValueError("no point was assigned to any centroid; is the data set empty?")
    dim = centroids.shape[1]
    sign = torch.ones(dim, dtype=torch.float64, device=centroids.device)
    sign[1::2] = -1.0
    for cluster in empty:
        largest = int(torch.argmax(counts))
        base = centroids[largest].clone()
        centroids[cluster] = base * (1.0 + SPLIT_EPSILON * sign)
        centroids[largest] = base * (1.0 - SPLIT_EPSILON * sign)
        counts[cluster] = counts[largest] / 2
        counts[largest] -= counts[cluster]
    return centroids.to(torch.float32), len(empty), counts


def hartigan_assign(
    x: torch.Tensor, centroids: torch.Tensor, sizes: torch.Tensor, rows_per_chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch step of Hartigan's k-means rule; returns (chosen cluster [n], nearest sq. distance [n]).

    Hartigan & Wong's method moves a point x from its cluster a (n_a members) to cluster b when
    that lowers the k-means objective once both means are updated, i.e. when
    n_b / (n_b + 1) · ||x - c_b||² < n_a / (n_a - 1) · ||x - c_a||². Lloyd's rule ignores the sizes,
    so it stops at partitions that Hartigan's rule still improves (by about 1 % on the 1,024-way
    clusterings of sentence embeddings measured in `bench/bench_kmeans.py`). This is the batch,
    stateless form: a point's current cluster is taken to be its nearest centroid (no per-point
    state, so any batch on any rank decides alone) and `sizes` are the previous iteration's
    all-reduced cluster sizes; a point in a cluster of at most one member stays. Like Lloyd's
    assignment, it is one [n, k] distance matmul; the second value is the plain nearest-centroid
    squared distance (the inertia of `centroids`).
    """
    sizes = sizes.to(device=x.device, dtype=x.dtype)
    # a lone member is its cluster's centroid: leaving saves nothing, so it stays (weight 0)
    stay_weight = torch.where(sizes > 1, sizes / (sizes - 1).clamp_min(1.0), torch.zeros_like(sizes))
    move_weight = sizes.clamp_min(1.0) / (sizes.clamp_min(1.0) + 1.0)
    # [x, ||x||², 1] · [-2c, 1, ||c||²] = ||x - c||²: full squared distances from the matmul itself
    c_aug = torch.cat([centroids * -2.0, torch.ones_like(centroids[:, :1]),
                       (centroids * centroids).sum(dim=1, keepdim=True)], dim=1).T.contiguous()
    chosen = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    nearest = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], rows_per_chunk):
        rows = x[start : start + rows_per_chunk]
        x_aug = torch.cat([rows, (rows * rows).sum(dim=1, keepdim=True), torch.ones_like(rows[:, :1])], dim=1)
        cost = x_aug @ c_aug  # [rows, k] squared distances
        own_distance, own = cost.min(dim=1)
        cost.mul_(move_weight)  # the cost of joining each other cluster
        cost.scatter_(1, own.unsqueeze(1), math.inf)
        move_cost, target = cost.min(dim=1)
        own_distance.clamp_min_(0.0)
        stays = own_distance * stay_weight[own] <= move_cost
        chosen[start : start + rows_per_chunk] = torch.where(stays, own, target)
        nearest[start : start + rows_per_chunk] = own_distance
    return chosen, nearest
