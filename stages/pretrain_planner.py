"""Stage 3: pretrain the planner on next-action prediction (`make pretrain-planner`).

Reads `0_prepare`, `1_embed` and `2_cluster` of the run directory (k, the embedding size and the
codebook come from their manifests) and writes `<run_dir>/3_planner/`: `planner.pt` (loadable
without Lightning via `Planner.from_pretrained`), `manifest.json` with validation accuracy next
to content-free baselines, TensorBoard events in `tb/` and resumable checkpoints in `checkpoints/`.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from planner_lm.artifacts import write_manifest
from planner_lm.cli import StageSpec, build_cli, resume_checkpoint
from planner_lm.data.planner_data import PlannerDataModule
from planner_lm.errors import friendly_errors
from planner_lm.lit.planner import PlannerModule
from planner_lm.models.planner import PLANNER_FILE

STAGE = "pretrain_planner"

SPEC = StageSpec(
    stage=STAGE,
    model_class=PlannerModule,
    datamodule_class=PlannerDataModule,
    description="Pretrain the planner: predict the next sentence's writing action from the previous "
                "sentences' cached embeddings (stage 3).",
    links=tuple((f"data.{name}", f"model.{name}") for name in
                ("num_actions", "embedding_dim", "centroids", "context_sentences")),
)


def fresh_or_resume(out: Path, upstream: dict[str, str]) -> str | None:
    """`last.ckpt` to resume from, unless it was trained on other upstream data (then start over)."""
    ckpt = resume_checkpoint(out)
    if ckpt is None:
        return None
    saved = torch.load(ckpt, map_location="cpu", weights_only=False).get("planner_upstream")
    if saved is not None and saved != upstream:
        print(f"{out / 'checkpoints'} was trained on other prepare/embed/cluster outputs; starting over")
        shutil.rmtree(out / "checkpoints")
        return None
    return ckpt


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


def run(args: list[str] | None = None) -> dict:
    """Train (or resume), export `planner.pt`, write the manifest; return it."""
    cli = build_cli(SPEC, args)
    model: PlannerModule = cli.model
    data: PlannerDataModule = cli.datamodule
    trainer, out = cli.trainer, cli.output_dir
    model.upstream_hashes = dict(data.upstream_hashes)
    ckpt = fresh_or_resume(out, model.upstream_hashes)
    started = time.perf_counter()
    start_step = trainer.global_step
    trainer.fit(model, datamodule=data, ckpt_path=ckpt)
    train_seconds = time.perf_counter() - started
    steps = int(trainer.global_step)
    exported_step = model.select_export_weights()
    validation = trainer.validate(model, datamodule=data, verbose=False)[0]
    if not trainer.is_global_zero:
        return {}
    model.planner.save_pretrained(out, upstream=data.upstream_hashes)
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
    manifest = write_manifest(out, stage=STAGE, config=cli.config_dict, inputs=data.inputs, outputs=[PLANNER_FILE],
                              facts=facts, metrics=metrics, seed=cli.config.get("seed_everything"))
    print(summary_table(metrics))
    print(f"pretrain-planner: k={data.num_actions}, {facts['num_parameters']:,} parameters, {steps} steps "
          f"(weights of step {exported_step}), {metrics['train_examples_per_s']:.0f} examples/s -> {out / PLANNER_FILE}")
    return manifest


def main(args: list[str] | None = None) -> None:
    with friendly_errors():
        run(args)


if __name__ == "__main__":
    main()
