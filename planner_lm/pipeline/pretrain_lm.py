"""Offline base LM (`make pretrain-lm`): a small GPT-2 trained from scratch on the train split.

No GPT-2 weights can be downloaded offline, so this stage trains a GPT-2-architecture model with
GPT-2's real tokenizer and writes `<run_dir>/lm/` as a standard Hugging Face directory
(`config.json`, `model.safetensors`, tokenizer files) that later stages use in GPT-2's place.
Online, skip it and pass a hub model to `finetune-joint` (`--data.lm gpt2`).
"""
from __future__ import annotations

import time

from planner_lm.cli import (StageSpec, build_cli, final_validation, finish_stage, resume_checkpoint)
from planner_lm.data.lm_pretrain_data import LMPretrainDataModule
from planner_lm.lit.lm_pretrain import CausalLMPretrainModule

STAGE = "pretrain_lm"

SPEC = StageSpec(
    stage=STAGE,
    model_class=CausalLMPretrainModule,
    datamodule_class=LMPretrainDataModule,
    description="Train a small GPT-2 from scratch with GPT-2's tokenizer: the offline base LM (lm/).",
    links=tuple((f"data.{name}", f"model.{name}") for name in ("vocab_size", "bos_token_id", "eos_token_id")),
    epochs_when_unbounded=1,  # the papers train one epoch
)


def run_pretrain_lm(args: list[str] | None = None) -> dict:
    """Train, export the Hugging Face directory, write the manifest; return it."""
    cli = build_cli(SPEC, args)
    model: CausalLMPretrainModule = cli.model
    data: LMPretrainDataModule = cli.datamodule
    trainer, out = cli.trainer, cli.output_dir
    started = time.perf_counter()
    start_step = trainer.global_step
    trainer.fit(model, datamodule=data, ckpt_path=resume_checkpoint(cli, data.inputs), weights_only=True)
    train_seconds = time.perf_counter() - started
    steps = int(trainer.global_step)
    validation = final_validation(trainer, model, data)
    if not trainer.is_global_zero:
        return {}
    files = model.export(out, data.tokenizer)
    arch = model.hparams
    metrics = {key: round(float(value), 4) for key, value in validation.items()}
    metrics.update(
        steps=steps,
        train_seconds=round(train_seconds, 1),
        seconds_per_step=round(train_seconds / max(1, steps - start_step), 3),
        train_windows=len(data.train_dataloader().dataset),
        train_tokens=data.train_tokens,
    )
    facts = {
        "model_type": model.config.model_type,
        "lm_name": f"gpt2-scratch-{arch.n_layer}x{arch.n_embd}",
        "tokenizer_name": data.tokenizer_name,
        "tokenizer_fingerprint": data.tokenizer_fingerprint,
        "vocab_size": data.vocab_size,
        "num_parameters": model.num_parameters,
        "n_positions": arch.n_positions,
        "window": data.window,
    }
    manifest = finish_stage(cli, inputs=data.inputs, outputs=files, facts=facts, metrics=metrics)
    print(f"pretrain-lm: {facts['lm_name']} ({model.num_parameters / 1e6:.1f} M parameters), "
          f"val perplexity {metrics['val/ppl']:.1f} after {steps} steps "
          f"({metrics['seconds_per_step']:.2f} s/step) -> {out}")
    return manifest
