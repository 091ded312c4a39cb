"""Does the planner beat copying? Planner designs vs content-free baselines, by document length.

Trains each planner design on the train split of a finished run (`0_prepare`, `1_embed`,
`2_cluster`, e.g. `runs/demo` after `make cluster`) with the same budget and seed, keeps the
epoch with the lowest validation NLL (as the stage does), and scores it on the test split next to
the baselines that read no sentence content: the previous sentence's action and the action
bigram of the training split. Scores are also given per bucket of document length (sentences
per document), because copying is strongest on long documents, where neighbouring sentences
share a topic. Prints one JSON object, kept as it grows (after each planner design) in `--json`
(default bench/out/planner_quality.json). The run's stages are checked before any training.

    .venv/bin/python bench/bench_planner_quality.py --run_dir runs/demo [--epochs 6] [--lr 1e-4] [--pooling mean last]

`--pooling` names the readouts to compare (see `planner_lm.models.planner`; `mean` is the
reference's). Compare learning rates by running it once per `--lr`.
"""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from _common import add_json_option, bench_report, require_stages
from planner_lm.data.planner_data import PlannerBatchCollator
from planner_lm.evaluation.planner_metrics import action_baselines, previous_actions
from planner_lm.hardware import cpu_flags
from planner_lm.models.planner import POOLINGS, Planner
from planner_lm.run_folder import RunFolder

BUCKETS = ((1, 3), (4, 8), (9, 30), (31, 10**9))


def batches(ids: np.ndarray, size: int, rng: np.random.Generator | None = None):
    order = rng.permutation(len(ids)) if rng is not None else np.arange(len(ids))
    for start in range(0, len(ids), size):
        yield ids[order[start:start + size]]


@torch.no_grad()
def predict(planner: Planner, collate: PlannerBatchCollator, ids: np.ndarray) -> tuple[np.ndarray, float]:
    """Argmax actions and mean NLL of `planner` on the sentences `ids`."""
    planner.eval()
    predictions, nll = [], 0.0
    for chunk in batches(ids, 2048):
        batch = collate(list(chunk))
        logits = planner(batch["context"], batch["mask"])
        nll += float(F.cross_entropy(logits, batch["target"], reduction="sum"))
        predictions.append(logits.argmax(-1).numpy())
    return np.concatenate(predictions), nll / len(ids)


def train(pooling: str, collate: PlannerBatchCollator, centroids: torch.Tensor, split_ids: dict[str, np.ndarray],
          args: argparse.Namespace) -> tuple[Planner, dict]:
    torch.manual_seed(args.seed)
    planner = Planner(centroids.shape[1], centroids.shape[0], context_sentences=args.context_sentences,
                      ffn_dim=args.ffn_dim, dropout=0.1, pooling=pooling)
    planner.init_head_from_centroids(centroids)
    optimizer = torch.optim.Adam(planner.parameters(), lr=args.lr, weight_decay=1e-4)
    rng = np.random.default_rng(args.seed)
    best = {"nll": float("inf"), "epoch": -1, "state": None}
    history = []
    _, nll0 = predict(planner, collate, split_ids["val"])
    started = time.perf_counter()
    for epoch in range(args.epochs):
        planner.train()
        for chunk in batches(split_ids["train"], args.batch_size, rng):
            batch = collate(list(chunk))
            loss = F.cross_entropy(planner(batch["context"], batch["mask"]), batch["target"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        predictions, nll = predict(planner, collate, split_ids["val"])
        history.append(round(nll, 4))
        if nll < best["nll"]:
            best = {"nll": nll, "epoch": epoch, "state": {k: v.clone() for k, v in planner.state_dict().items()}}
    planner.load_state_dict(best["state"])
    return planner, {"val_nll_untrained": round(nll0, 4), "val_nll_by_epoch": history, "best_epoch": best["epoch"],
                     "train_seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run_dir", default="runs/demo")
    parser.add_argument("--pooling", nargs="+", default=list(POOLINGS), choices=POOLINGS)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--ffn_dim", type=int, default=512)
    parser.add_argument("--context_sentences", type=int, default=6)
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument("--seed", type=int, default=0)
    add_json_option(parser, "planner_quality")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with bench_report("planner_quality", args.json) as report:
        require_stages(args.run_dir, ["prepare", "embed", "cluster"], option=f"--run_dir {args.run_dir}")
        measure(args, report)


def measure(args: argparse.Namespace, result) -> None:
    """Baselines first, then each planner design; the report is saved after each."""
    folder = RunFolder(args.run_dir)
    prepared, doc_first = folder.prepared, folder.doc_first
    actions = np.asarray(folder.actions())
    centroids = torch.from_numpy(folder.codebook())
    collate = PlannerBatchCollator(folder.embeddings_path, folder.actions_path, doc_first, args.context_sentences)
    split_ids = {name: np.arange(*prepared.sentence_range(name)) for name in ("train", "val", args.split)}
    targets = split_ids[args.split]
    # document length (sentences) of each target's document
    doc_len = np.bincount(doc_first)[doc_first[targets]] if len(targets) else np.zeros(0, int)
    truth = actions[targets]
    # "copy" as action_baselines scores it: the majority training action at a document start
    majority = int(np.bincount(actions[split_ids["train"]], minlength=len(centroids)).argmax())
    previous = previous_actions(actions, targets, doc_first, majority)

    def bucketed(correct: np.ndarray) -> dict[str, dict]:
        out = {}
        for lo, hi in BUCKETS:
            keep = (doc_len >= lo) & (doc_len <= hi)
            name = f"{lo}-{hi}" if hi < 10**9 else f"{lo}+"
            out[name] = {"sentences": int(keep.sum()), "top1": round(float(correct[keep].mean()), 4) if keep.any() else None}
        return out

    k = len(centroids)
    result.update({
        "run_dir": args.run_dir, "split": args.split, "num_actions": k, "sentences": int(len(targets)),
        "host": {"cpu_flags": cpu_flags(), "machine": platform.machine(), "threads": torch.get_num_threads()},
        "settings": {key: value for key, value in vars(args).items() if key not in ("run_dir", "pooling")},
        "baselines": {key: round(value, 4) for key, value in action_baselines(
            actions, split_ids["train"], targets, doc_first, k).items()},
        "baselines_by_doc_length": {"previous_top1": bucketed(truth == previous)},
        "planners": {},
    })
    result.save()
    for pooling in args.pooling:
        planner, info = train(pooling, collate, centroids, split_ids, args)
        predictions, nll = predict(planner, collate, targets)
        correct = predictions == truth
        best_baseline = max(result["baselines"]["previous_top1"], result["baselines"]["bigram_top1"])
        result["planners"][pooling] = {
            "top1": round(float(correct.mean()), 4), "nll": round(nll, 4),
            "points_over_best_baseline": round(100 * (float(correct.mean()) - best_baseline), 2),
            "by_doc_length": bucketed(correct), **info,
        }
        result.save()


if __name__ == "__main__":
    main()
