"""Stage 2: k-means over the sentence embeddings = the codebook of writing actions (`make cluster`).

Reads `0_prepare` and `1_embed` of the run directory, fits k-means on the training sentences (or
a seeded subsample, `--data.fit_sample_size`) with one Lloyd iteration per epoch (any Lightning
strategy: `--trainer.devices 4 --trainer.strategy ddp`), then assigns every sentence of every split
and writes `<run_dir>/2_cluster/`: `centroids.npy` (float32 [k, dim]), `actions.npy` (int32, one id
per sentence), `report/` (sizes, entropy, examples, plots) and `manifest.json`. Killed runs resume
from `checkpoints/last.ckpt`.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from tqdm.auto import tqdm

from planner_lm.artifacts import atomic_save_npy
from planner_lm.cli import StageSpec, build_cli, finish_stage, resume_checkpoint
from planner_lm.data.embeddings import ClusterDataModule
from planner_lm.evaluation.cluster_report import format_summary, write_cluster_report
from planner_lm.lit.kmeans import KMeansModule
from planner_lm.prepared import PreparedCorpus
from planner_lm.run_folder import ACTIONS_FILE, CENTROIDS_FILE
from planner_lm.seeding import global_seed

STAGE = "cluster"

SPEC = StageSpec(
    stage=STAGE,
    model_class=KMeansModule,
    datamodule_class=ClusterDataModule,
    description="Cluster sentence embeddings with k-means into writing actions (stage 2).",
    links=(("data.embedding_dim", "model.embedding_dim"),),
    trainer_defaults={"max_epochs": 100, "log_every_n_steps": 1, "precision": "32-true"},  # exact distances
)


def sentence_text_lookup(prepared: PreparedCorpus, split: str):
    """Text of sentences by index within `split`, without materialising every sentence string."""
    table = prepared.split(split).data
    first = np.asarray(table.column("first_sentence").to_numpy(), dtype=np.int64)
    offset = prepared.sentence_range(split)[0]
    texts, starts, ends = (table.column(name) for name in ("text", "sent_start", "sent_end"))

    def text_of(indices: np.ndarray) -> list[str]:
        out = []
        for global_id in np.asarray(indices, dtype=np.int64) + offset:
            doc = int(np.searchsorted(first, global_id, side="right")) - 1
            i = int(global_id - first[doc])
            text = texts[doc].as_py()
            out.append(text[starts[doc][i].as_py():ends[doc][i].as_py()])
        return out
    return text_of


@torch.no_grad()
def assign_all(model: KMeansModule, data: ClusterDataModule) -> tuple[np.ndarray, np.ndarray]:
    """Action id (int32) and squared distance (float32) of every sentence, batch by batch."""
    rows = data.all_rows()
    actions = np.empty(rows.num_rows, dtype=np.int32)
    distances = np.empty(rows.num_rows, dtype=np.float32)
    for index in tqdm(range(rows.num_batches), desc="assigning sentences", unit="batch", leave=False):
        lo = index * rows.batch_size
        ids, dist = model.assign(rows.batch(index))
        actions[lo : lo + len(ids)] = ids.cpu().numpy()
        distances[lo : lo + len(ids)] = dist.float().cpu().numpy()
    return actions, distances


def run_cluster(args: list[str] | None = None) -> dict:
    """Fit (or resume), assign every sentence, write outputs, report and manifest; return the manifest."""
    cli = build_cli(SPEC, args)
    model: KMeansModule = cli.model
    data: ClusterDataModule = cli.datamodule
    trainer, out = cli.trainer, cli.output_dir
    k = model.hparams.num_clusters
    data.validate(k)  # k vs training sentences, NaN/inf: before any heavy work
    ckpt = resume_checkpoint(cli, data.inputs)
    started = time.perf_counter()
    trainer.fit(model, datamodule=data, ckpt_path=ckpt, weights_only=True)
    fit_seconds = time.perf_counter() - started
    if not trainer.is_global_zero:
        return {}
    if trainer.strategy.root_device.type != model.device.type:  # e.g. back from ddp_spawn
        model.to(trainer.strategy.root_device)
    actions, distances = assign_all(model, data)
    seconds = time.perf_counter() - started
    atomic_save_npy(out / CENTROIDS_FILE, model.centroids.detach().float().cpu().numpy())
    atomic_save_npy(out / ACTIONS_FILE, actions)

    lo, hi = data.train_range
    fit_rows = data.fit_rows(global_seed())
    final_inertia = float(distances[fit_rows].astype(np.float64).sum())
    report = write_cluster_report(
        out / "report", actions[lo:hi], distances[lo:hi], k, model.inertia_curve, final_inertia,
        sentence_text_lookup(data.prepared, "train"),
        extra={"iterations": model.iterations, "converged": model.converged, "backend": model.backend_name},
    )
    stats = report["train_cluster_sizes"]
    experiment = getattr(trainer.logger, "experiment", None)
    if hasattr(experiment, "add_histogram"):  # TensorBoard: final cluster sizes and inertia
        experiment.add_histogram("cluster/sizes", np.bincount(actions[lo:hi], minlength=k), model.iterations)
        experiment.add_scalar("cluster/final_inertia", final_inertia, model.iterations)
        experiment.flush()

    facts = {
        "num_actions": k,
        "embedding_dim": data.embedding_dim,
        "num_sentences": data.num_sentences,
        "fit_sentences": int(len(fit_rows)),
        "encoder": data.embed_manifest.fact("encoder"),
    }
    metrics = {
        "iterations": model.iterations,
        "converged": model.converged,
        "inertia_curve": [round(v, 4) for v in model.inertia_curve],
        "final_inertia": round(final_inertia, 4),
        "mean_squared_distance_train": round(float(distances[lo:hi].mean()), 6),
        "cluster_sizes": {key: value for key, value in stats.items() if key != "num_clusters"},
        "backend": model.backend_name,
        "fit_seconds": round(fit_seconds, 2),
        "seconds": round(seconds, 2),
    }
    manifest = finish_stage(cli, inputs=data.inputs, outputs=[CENTROIDS_FILE, ACTIONS_FILE, "report"], facts=facts,
                            metrics=metrics)
    print(format_summary(stats))
    print(f"cluster: k={k}, {model.iterations} k-means iterations ({'converged' if model.converged else 'max_epochs'}), "
          f"final inertia {final_inertia:.2f}, {seconds:.1f} s -> {out}")
    return manifest
