"""Stage 3: pretrain the planner on next-action prediction (`make pretrain-planner`).

Reads `0_prepare`, `1_embed` and `2_cluster` of the run directory (k, the embedding size and the
codebook come from their manifests) and writes `<run_dir>/3_planner/`: `planner/` (safetensors + JSON, loadable
without Lightning via `Planner.from_pretrained`), `manifest.json` with validation accuracy next
to content-free baselines, TensorBoard events in `tb/` and resumable checkpoints in `checkpoints/`.
"""
from __future__ import annotations

import time

from planner_lm.cli import StageSpec, build_cli, finish_stage, resume_checkpoint
from planner_lm.data.planner_data import PlannerDataModule
from planner_lm.lit.planner import PlannerModule
from planner_lm.models.planner import PLANNER_DIR

STAGE = "pretrain_planner"

SPEC = StageSpec(
    stage=STAGE,
    model_class=PlannerModule,
    datamodule_class=PlannerDataModule,
    description="Pretrain the planner: predict the next sentence's writing action from the previous "
                "sentences' cached embeddings (stage 3).",
    links=tuple((f"data.{name}", f"model.{name}") for name in
                ("num_actions", "embedding_dim", "centroids", "context_sentences")),
    epochs_when_unbounded=1,  # the papers train one epoch
)


def summary_table(metrics: dict[str, float]) -> str:
    """Validation accuracy of the planner next to the content-free baselines."""
    top = "top5" if "val/top5" in metrics else next(k.split("/")[1] for k in metrics if k.startswith("val/top") and k != "val/top1")
    rows = [("planner", metrics.get("val/top1"), metrics.get(f"val/{top}")),
            ("majority action", metrics.get("val/baseline_majority_top1"), metrics.get(f"val/baseline_majority_{top}")),
            ("previous sentence's action", metrics.get("val/baseline_previous_top1"), None),
            ("action bigram (train counts)", metrics.get("val/baseline_bigram_top1"), metrics.get(f"val/baseline_bigram_{top}"))]

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    lines = [f"{'validation':<30} {'top-1':>7} {top:>7}"]
    lines += [f"{name:<30} {pct(a):>7} {pct(b):>7}" for name, a, b in rows]
    return "\n".join(lines)


def run_pretrain_planner(args: list[str] | None = None) -> dict:
    """Train (or resume), export `planner/`, write the manifest; return it."""
    cli = build_cli(SPEC, args)
    model: PlannerModule = cli.model
    data: PlannerDataModule = cli.datamodule
    trainer, out = cli.trainer, cli.output_dir
    ckpt = resume_checkpoint(cli, data.inputs)
    started = time.perf_counter()
    start_step = trainer.global_step
    trainer.fit(model, datamodule=data, ckpt_path=ckpt, weights_only=True)
    train_seconds = time.perf_counter() - started
    steps = int(trainer.global_step)
    exported_step = model.select_export_weights()
    validation = trainer.validate(model, datamodule=data, verbose=False)[0]
    if not trainer.is_global_zero:
        return {}
    model.planner.save_pretrained(out / PLANNER_DIR, upstream=data.upstream_hashes)
    metrics = {key: round(float(value), 6) for key, value in validation.items()}
    trained_steps = max(0, steps - start_step)
    metrics.update(
        steps=steps,
        exported_step=exported_step,
        train_seconds=round(train_seconds, 1),
        train_examples_per_s=round(trained_steps * data.batch_size * trainer.world_size / max(train_seconds, 1e-9), 1),
    )
    facts = {
        "num_actions": data.num_actions,
        "embedding_dim": data.embedding_dim,
        "context_sentences": data.context_sentences,
        "num_parameters": sum(p.numel() for p in model.planner.parameters()),
        "train_sentences": data.num_train,
        "val_sentences": data.num_val,
    }
    manifest = finish_stage(cli, inputs=data.inputs, outputs=[PLANNER_DIR], facts=facts, metrics=metrics)
    print(summary_table(metrics))
    print(f"pretrain-planner: k={data.num_actions}, {facts['num_parameters']:,} parameters, {steps} steps "
          f"(weights of step {exported_step}), {metrics['train_examples_per_s']:.0f} examples/s -> {out / PLANNER_DIR}")
    return manifest
