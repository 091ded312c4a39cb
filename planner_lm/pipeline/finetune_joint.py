"""Stage 4: planner + action-conditioned LM fine-tuned end to end (`make finetune-joint`, `make baselines`).

Writes `<run_dir>/4_joint-<selection>/`: `lm/` (the conditioned LM, loadable without this repo's
Lightning code through `ActionConditionedLM.from_pretrained`), `planner/` (selections that use
the planner) and `manifest.json` with the final validation perplexity.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from planner_lm.artifacts import atomic_write_text
from planner_lm.cli import (StageSpec, build_cli, final_validation, finish_stage, resume_checkpoint)
from planner_lm.data.joint_data import JointDataModule
from planner_lm.errors import UserError
from planner_lm.lit.joint import JointPlannerLM
from planner_lm.models.selection import SELECTIONS
from planner_lm.run_folder import JOINT_LM_DIR, PLANNER_DIR, VAL_CURVE_FILE, stage_dir

STAGE = "finetune_joint"


def joint_dir(cfg: Any) -> Path:
    """`4_joint-<selection>`: each selection (the method and every baseline) has its own directory
    (a selection that does not exist is refused here, before its directory is made)."""
    if cfg.model.selection not in SELECTIONS:
        raise UserError(f"unknown selection {cfg.model.selection!r}; choose one of: {', '.join(SELECTIONS)}")
    return stage_dir(cfg.run_dir, STAGE, cfg.model.selection)


SPEC = StageSpec(
    stage=STAGE,
    model_class=JointPlannerLM,
    datamodule_class=JointDataModule,
    description="Fine-tune the planner and the action-conditioned LM end to end (stage 4).",
    links=tuple((f"data.{name}", f"model.{name}") for name in
                ("lm_path", "planner_path", "codebook_path", "num_actions", "embedding_dim", "init_lm_path")),
    output_dir=joint_dir,
    epochs_when_unbounded=1,  # the papers train one epoch
)


def total_steps(data: JointDataModule, steps: int) -> int | None:
    """Optimizer steps from this run's initialisation: its own, plus its warm start's total (None
    when the warm start's total is unknown)."""
    if not data.init_from:
        return steps
    before = data.folder.joint_run(data.init_from).total_steps
    return None if before is None else before + steps


def run_finetune_joint(args: list[str] | None = None) -> dict:
    """Train (or, for the untouched plain LM, only evaluate), save the hand-offs, write the manifest."""
    cli = build_cli(SPEC, args)
    model: JointPlannerLM = cli.model
    data: JointDataModule = cli.datamodule
    trainer, out = cli.trainer, cli.output_dir
    started = time.perf_counter()
    trained = model.has_trainable_parameters()
    best = None
    if trained:
        trainer.fit(model, datamodule=data, ckpt_path=resume_checkpoint(cli, data.inputs), weights_only=True)
        best = model.select_export_weights()
        # the best weights were validated during fit; the final ones by fit's last validation
        validation = best[1] if best else final_validation(trainer, model, data)
    else:
        print(f"selection '{model.selection}' with {model.hparams.base_mode} base weights has nothing to "
              "train: evaluating the untouched base LM")
        validation = trainer.validate(model, datamodule=data, verbose=False)[0]
    seconds = time.perf_counter() - started

    outputs = [JOINT_LM_DIR]
    curve = list(model.val_curve)
    if best is None and trained and (not curve or curve[-1]["step"] != trainer.global_step):
        curve.append({"step": int(trainer.global_step), **{k: round(float(v), 6) for k, v in validation.items()}})
    if curve:
        outputs.append(VAL_CURVE_FILE)
    lm, planner = model.hand_off_modules()  # under FSDP: full copies gathered from every rank
    if trainer.is_global_zero:
        if curve:
            atomic_write_text(out / VAL_CURVE_FILE, json.dumps(curve, indent=1) + "\n")
        lm.save_pretrained(out / JOINT_LM_DIR, tokenizer=data.tokenizer)
        if planner is not None:
            planner.save_pretrained(out / PLANNER_DIR, upstream={name: str(path) for name, path in data.inputs.items()})
    if model.planner is not None:
        outputs.append(PLANNER_DIR)
    metrics = {key: round(float(value), 6) for key, value in validation.items()}
    if model.planner_acc_start is not None:
        metrics["val/planner_acc_start"] = round(model.planner_acc_start, 6)
    metrics.update(seconds=round(seconds, 1), steps=int(trainer.global_step),
                   exported_step=best[0] if best else int(trainer.global_step))
    facts = {
        "selection": model.selection,
        "num_actions": data.num_actions,
        "embedding_dim": data.embedding_dim,
        "context_sentences": data.context_sentences if model.planner is not None else None,
        "tokenizer_fingerprint": data.tokenizer_fingerprint,
        "lm_name": data.lm_name,
        "base_mode": model.hparams.base_mode,
        "trained": trained,
        "init_from": data.init_from,  # warm start: the joint run whose LM this one started from
        "total_steps": total_steps(data, int(trainer.global_step)),  # from the initialisation: the budget compared
        "note": None if trained else "plain LM with frozen weights: the untouched base LM, evaluated directly",
    }
    manifest: dict = {}
    if trainer.is_global_zero:
        manifest = finish_stage(cli, inputs=data.inputs, outputs=outputs, facts=facts, metrics=metrics)
        summary = f"{model.selection}: val perplexity {metrics['val/ppl']:.2f}"
        if "val/planner_acc" in metrics:
            summary += f", planner accuracy {100 * metrics['val/planner_acc']:.1f}%"
            if model.planner_acc_start is not None:
                summary += f" (before joint training {100 * model.planner_acc_start:.1f}%)"
        if facts["total_steps"] != metrics["steps"]:
            summary += f" ({facts['total_steps']} steps from its initialisation, {data.init_from}'s included)"
        print(f"{summary}; {metrics['steps']} steps in {seconds:.0f} s -> {out}")
    return manifest
