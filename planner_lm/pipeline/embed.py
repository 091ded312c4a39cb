"""Stage 1: one unit-norm vector per sentence with a frozen sentence encoder (`make embed`).

Reads `0_prepare` of the run directory and writes `<run_dir>/1_embed/`: `embeddings.npy`
(float16 [num_sentences, dim], row = global sentence id) and `manifest.json`. Runs as
`Trainer.predict` over length-sorted batches, so `--trainer.devices 4 --trainer.strategy ddp`
spreads it over GPUs; precision defaults to bf16 autocast where the hardware computes bf16
natively and fp32 elsewhere (override with `--trainer.precision`). Finished shards
(`shards/`) survive a killed run and are skipped when the same command is run again.
"""
from __future__ import annotations

import time

import numpy as np

from planner_lm.cli import StageSpec, build_cli, finish_stage
from planner_lm.data.embed_data import EmbedDataModule, count_truncated, remove_shards, reset_shards_if_plan_changed
from planner_lm.run_folder import EMBEDDINGS_FILE
from planner_lm.lit.embed import SentenceEmbedder, ShardWriter, consolidate_shards

STAGE = "embed"

SPEC = StageSpec(
    stage=STAGE,
    model_class=SentenceEmbedder,
    datamodule_class=EmbedDataModule,
    description="Embed every sentence of the prepared corpus with a frozen sentence encoder (stage 1).",
    trainer_defaults={"logger": False, "enable_checkpointing": False},  # precision: build_cli's fast default
)


def run_embed(args: list[str] | None = None) -> dict:
    """Embed (or resume), consolidate the shards, write the manifest; return it."""
    cli = build_cli(SPEC, args)
    model: SentenceEmbedder = cli.model
    data: EmbedDataModule = cli.datamodule
    trainer, out = cli.trainer, cli.output_dir
    plan = data.plan_record(encoder=model.hparams.encoder, max_seq_length=model.hparams.max_seq_length,
                            precision=str(trainer.precision), backend=model.backend,
                            quantize=model.quantize)
    if trainer.global_rank == 0:
        resumed = reset_shards_if_plan_changed(data.shard_dir, plan)
        pending = len(data.pending_shards())
        print(f"embed: {data.num_sentences:,} sentences in {data.plan.num_shards} shards"
              + (f"; resuming, {pending} shards left" if resumed else ""))
    trainer.callbacks.append(ShardWriter(data.shard_dir))
    started = time.perf_counter()
    trainer.predict(model, datamodule=data, return_predictions=False)
    trainer.strategy.barrier("embed shards written")
    seconds = time.perf_counter() - started
    if not trainer.is_global_zero:
        return {}
    dim = consolidate_shards(data.shard_dir, data.plan, data.num_sentences, out / EMBEDDINGS_FILE)
    norms = np.linalg.norm(np.load(out / EMBEDDINGS_FILE, mmap_mode="r")[:4096].astype(np.float32), axis=1)
    facts = {"encoder": model.hparams.encoder, "embedding_dim": dim, "num_sentences": data.num_sentences,
             "dtype": "float16", "max_seq_length": model.encoder.max_seq_length,
             "backend": model.backend, "quantize": model.quantize}
    window = int(model.encoder.max_seq_length)
    truncated = count_truncated(data.texts, model.encoder.tokenizer, window)
    if truncated:
        print(f"embed: note: {truncated:,} sentences ({100 * truncated / data.num_sentences:.2f}%) are longer than "
              f"the encoder's window of {window} tokens; only their first {window} tokens are embedded")
    metrics = {"seconds": round(seconds, 2), "sentences_per_s": round(data.num_sentences / max(seconds, 1e-9), 1),
               "truncated_sentences": truncated,
               "precision": str(trainer.precision), "devices": trainer.world_size,
               "compute": getattr(model.encoder, "description", f"torch {trainer.precision}"),
               "norm_min": round(float(norms.min()), 4), "norm_max": round(float(norms.max()), 4)}
    manifest = finish_stage(cli, inputs=data.inputs, outputs=[EMBEDDINGS_FILE], facts=facts,
                            metrics=metrics)
    remove_shards(data.shard_dir)  # the consolidated file supersedes them
    print(f"embed: {data.num_sentences:,} × {dim} ({model.hparams.encoder}, {metrics['compute']}) in {seconds:.1f} s "
          f"({metrics['sentences_per_s']:.0f} sentences/s over this run) -> {out / EMBEDDINGS_FILE}")
    return manifest
