"""Joint planner + action-conditioned LM fine-tuning (the seed paper's end-to-end training).

Per batch the planner runs ONCE per distinct target sentence on the cached embeddings of the
sentences before it; its logits become action weights through ``select_weights`` (one function
for every selection mode, so comparisons are fair) and are expanded to the positions that
predict a token of that sentence. The conditioned LM turns weights into per-layer action
embeddings (``weights @ codebook``) added before each chosen layer's attention output projection.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from planner_lm.errors import UserError
from planner_lm.lit.best_weights import BestWeights
from planner_lm.lit.callbacks import UnfreezeSchedule, resolve_unfreeze_step
from planner_lm.lit.losses import global_batch_mean, next_token_nll
from planner_lm.lit.joint_setup import initialise_residual, joint_optimizers, measure_planner_start
from planner_lm.lit.schedules import SCHEDULES
from planner_lm.lit import strategies
from planner_lm.models.conditioning import ActionConditionedLM
from planner_lm.models.scale import build_conditioned_lm, full_copy, shard
from planner_lm.models.planner import Planner
from planner_lm.models.selection import GRADIENT_SELECTIONS, PLANNER_SELECTIONS, check_selection, select_weights

__all__ = ["JointPlannerLM"]

FSDP_STRATEGY = strategies.NAME
"""`--trainer.strategy fsdp2`: registered with Lightning when this module is imported."""


class JointPlannerLM(L.LightningModule):
    """Planner and action-conditioned LM trained together on the LM loss.

    Args:
        selection: how the LM sees the plan: soft (softmax(logits/T)·codebook, the paper's
            method), pred (the same soft weights from the frozen pretrained planner: the
            reference's PRED stage, which joint training can warm-start from), hard (argmax, no gradient to the planner), straight_through (hard forward,
            soft backward), gumbel (Gumbel-softmax while training, soft at evaluation), oracle
            (k-means action of the true sentence), fixed (action 0 everywhere), boundary (actions
            0 and 1 alternating by sentence: marks sentence starts, no content), uniform (mean of
            the codebook) or none (the plain LM, no adapters).
        temperature: softmax temperature T of soft / straight_through / gumbel (paper: 1.0).
        gumbel_scale: scale of the Gumbel noise added to the logits in `gumbel` training.
        base_mode: what happens to the base LM's own weights: frozen (paper default), lora
            (peft LoRA layers) or full (full fine-tuning).
        lora_r: LoRA rank (base_mode lora).
        lora_alpha: LoRA scaling numerator (base_mode lora).
        conditioned_layers: indices of the transformer layers that receive the action; default
            all but the first two (the paper).
        adapter_site: where the action enters each conditioned layer: `attention_output` (the
            input of the attention output projection, the reference's GPT-2 adapter) or
            `ffn_input` (the input of the feed-forward block, the reference's OLMo adapter).
        per_layer_codebook: each conditioned layer gets its own trainable copy of the codebook
            (the authors' default) instead of one shared codebook.
        codebook_unfreeze_at: when the codebook starts training: a step (int), a fraction of
            training (float in [0, 1)), or negative for never (codebook stays the k-means centroids).
        planner_unfreeze_at: when the planner starts training: step (int), fraction of training
            (float in [0, 1)), or negative for never (0 = from the start, the paper's default).
        planner_loss_weight: weight of the planner's next-action cross-entropy (on the k-means
            actions of the batch's sentences) added to the LM loss; 0 = LM loss only (the paper).
        lr: Adam learning rate of the LM's trainable weights (paper: 1e-4).
        planner_lr: learning rate of the planner; None (default) = `lr`, 0 = the planner never moves.
        weight_decay: Adam weight decay (L2 added to the gradient, as the reference) of every trained weight (paper: 0).
        conditioning: how actions enter the LM: `paper` (the reference's Xavier adapters on the raw
            action embedding) or `residual` (a shared per-layer shift every token trains, plus a
            zero-initialised adapter on the centred action embedding: at step 0 every code source
            gives the same model, and the plan matters only as far as it earns it).
        residual_rank: `residual` only: r > 0 projects the centred action embedding to r dimensions
            (one projection shared by all layers) before each layer's adapter; 0 = full width.
        residual_lr: learning rate of the code-dependent weights (adapter weights, projection,
            codebooks); None = `lr`. The shared shifts (adapter biases) keep `lr`.
        residual_weight_decay: weight decay of the code-dependent weights (L2, like `weight_decay`),
            pulling the plan's part back to zero unless the data keep it; None = `weight_decay`.
        residual_init: `residual` only: `zero` (the plan starts at exactly zero) or `hidden_states`
            (before the first step, each adapter is fitted so that each action maps to
            `residual_init_scale` x the base's own mean hidden-state difference for that action,
            measured on the first `residual_init_batches` training batches: the oracle run then
            starts where the ceiling probe steers). A warm start keeps its weights instead.
        residual_init_scale: the scale of that initialisation (the ceiling probe's α).
        residual_init_batches: training batches (in corpus order) the directions are measured on.
        lr_schedule: `constant` (the papers) or `cosine`: linear warm-up over `warmup_steps`, then
            cosine decay to `min_lr_ratio` of every group's rate at the last step.
        warmup_steps: warm-up steps of the cosine schedule.
        min_lr_ratio: the cosine schedule's final rate as a fraction of the peak.
        forgetting_warn_drop: warn when the planner's validation accuracy falls more than this
            many percentage points below its accuracy before joint training.
        planner_dropout: dropout inside the planner during joint training (the reference planner
            has none; its pretraining dropout would otherwise make training noisier than evaluation).
        export_best: hand off the weights of the validation with the lowest LM loss (the papers
            select by validation loss) instead of the final ones.
        base_dtype: load a frozen base in this dtype (`bfloat16`: half the memory of a large
            base; adapters, codebooks and planner stay float32); None = as saved.
        activation_checkpointing: recompute each base block's activations in backward instead of
            keeping them (memory for time on large bases).
        lm_path: base LM directory or hub name (linked from the data module).
        planner_path: the `planner/` folder of the pretrained planner (linked from the data module).
        codebook_path: `centroids.npy` of the cluster stage (linked from the data module).
        num_actions: number of actions k (linked from the data module).
        embedding_dim: sentence-embedding dimension (linked from the data module).
        init_lm_path: start the LM from this saved conditioned LM's adapters and codebooks (linked
            from the data module's `init_from`: a warm start from another joint run, e.g. `pred`).
    """

    def __init__(
        self,
        selection: str = "soft",
        temperature: float = 1.0,
        gumbel_scale: float = 1.0,
        base_mode: str = "frozen",
        lora_r: int = 8,
        lora_alpha: int = 32,
        conditioned_layers: list[int] | None = None,
        adapter_site: Literal["attention_output", "ffn_input"] = "attention_output",
        per_layer_codebook: bool = True,
        codebook_unfreeze_at: int | float = 0,
        planner_unfreeze_at: int | float = 0,
        planner_loss_weight: float = 0.0,
        lr: float = 1e-4,
        planner_lr: float | None = None,
        weight_decay: float = 0.0,
        conditioning: Literal["paper", "residual"] = "paper",
        residual_rank: int = 0,
        residual_lr: float | None = None,
        residual_weight_decay: float | None = None,
        residual_init: Literal["zero", "hidden_states"] = "zero",
        residual_init_scale: float = 1.0,
        residual_init_batches: int = 32,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        forgetting_warn_drop: float = 5.0,
        planner_dropout: float = 0.0,
        export_best: bool = True,
        base_dtype: str | None = None,
        activation_checkpointing: bool = False,
        lm_path: str = "",
        planner_path: str | None = None,
        codebook_path: str = "",
        num_actions: int = 0,
        embedding_dim: int = 0,
        init_lm_path: str | None = None,
    ) -> None:
        super().__init__()
        try:
            check_selection(selection)
        except ValueError as err:
            raise UserError(f"--model.selection: {err}") from err
        if temperature <= 0:
            raise UserError(f"--model.temperature must be > 0, got {temperature}")
        if planner_loss_weight < 0:
            raise UserError(f"--model.planner_loss_weight must be >= 0, got {planner_loss_weight}")
        if lr_schedule not in SCHEDULES:
            raise UserError(f"--model.lr_schedule must be one of {', '.join(SCHEDULES)}, got {lr_schedule!r}")
        if warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
            raise UserError(f"--model.warmup_steps must be >= 0 and --model.min_lr_ratio in [0, 1], got "
                            f"{warmup_steps} and {min_lr_ratio}")
        if residual_init not in ("zero", "hidden_states") or (residual_init != "zero" and conditioning != "residual"):
            raise UserError(f"--model.residual_init must be zero or hidden_states (the latter needs --model.conditioning "
                            f"residual), got {residual_init} with {conditioning}")
        if residual_init_batches < 1:
            raise UserError(f"--model.residual_init_batches must be >= 1, got {residual_init_batches}")
        for at in (planner_unfreeze_at, codebook_unfreeze_at):
            resolve_unfreeze_step(at, total_steps=100)  # rejects malformed schedules before any work
        self.save_hyperparameters()
        self.selection = selection
        self.uses_planner = selection in PLANNER_SELECTIONS
        if planner_loss_weight > 0 and not self.uses_planner:
            raise UserError(f"--model.planner_loss_weight > 0 needs a planner, but selection {selection!r} uses none")
        if planner_loss_weight > 0 and selection == "pred":
            raise UserError("selection 'pred' keeps the pretrained planner frozen: drop --model.planner_loss_weight "
                            "(or train selection soft)")
        self.num_actions = num_actions

        codebook = torch.from_numpy(np.load(codebook_path).astype(np.float32))
        if tuple(codebook.shape) != (num_actions, embedding_dim):
            raise UserError(f"codebook {codebook_path} has shape {tuple(codebook.shape)}, expected ({num_actions}, {embedding_dim})")
        self.lm = self._build_lm(codebook)
        if init_lm_path:
            self.lm.warm_start(init_lm_path)
        self.planner: Planner | None = None
        if self.uses_planner:
            if not planner_path:
                raise UserError(f"selection {selection!r} needs the pretrained planner; run `make pretrain-planner`")
            self.planner = Planner.from_pretrained(planner_path)
            if (self.planner.num_actions, self.planner.embedding_dim) != (num_actions, embedding_dim):
                raise UserError(
                    f"the planner predicts {self.planner.num_actions} actions over {self.planner.embedding_dim}-d "
                    f"embeddings but the codebook is ({num_actions}, {embedding_dim}); re-run `make pretrain-planner`"
                )
            if not 0.0 <= planner_dropout < 1.0:
                raise UserError(f"--model.planner_dropout must be in [0, 1), got {planner_dropout}")
            self.planner.set_dropout(planner_dropout)
            if selection not in GRADIENT_SELECTIONS and planner_loss_weight == 0:
                # no loss reaches it (hard argmax): frozen from the start, so DDP never waits for its gradients
                self.planner.requires_grad_(False)
        # from_pretrained leaves models in eval mode; train like the reference.
        self.train()
        self.best = BestWeights()
        self.val_nll = MeanMetric()
        self.val_planner_acc = MeanMetric()
        self.planner_acc_start: float | None = None
        self.val_curve: list[dict[str, float]] = []  # one row per validation during fit: step and val/* metrics
        self.schedules: dict[str, UnfreezeSchedule] = {}
        self.strict_loading = False  # resume checkpoints leave the frozen base out (on_save_checkpoint)
        self._sharded = False

    def _build_lm(self, codebook: Tensor) -> ActionConditionedLM:
        h = self.hparams
        return build_conditioned_lm(h.lm_path, codebook, h.selection, h.base_mode, h.conditioned_layers,
                                    h.per_layer_codebook, h.lora_r, h.lora_alpha, h.adapter_site, h.base_dtype,
                                    h.activation_checkpointing, h.conditioning, h.residual_rank)

    # ------------------------------------------------------------------ large bases
    def configure_model(self) -> None:
        """FSDP under `--trainer.strategy fsdp2` (configs/strategies/fsdp.yaml): shard the base blocks, the
        conditioned LM and the planner over the data-parallel mesh; other strategies: nothing."""
        if self.device_mesh is not None and not self._sharded:
            shard(self.lm, self.planner, self.device_mesh["data_parallel"])
            self._sharded = True

    def hand_off_modules(self) -> tuple[ActionConditionedLM | None, Planner | None]:
        """The conditioned LM and planner to save: these modules, or, when sharded, full copies
        gathered from every rank (call on every rank; rank 0 gets them, others None)."""
        if not self._sharded:
            return self.lm, self.planner
        codebook = torch.from_numpy(np.load(self.hparams.codebook_path).astype(np.float32))
        lm = full_copy(self.lm, lambda: self._build_lm(codebook))
        planner = None if self.planner is None else full_copy(self.planner, lambda: Planner(**self.planner.config))
        return lm, planner

    def _frozen_base_keys(self) -> set[str]:
        """State-dict keys of the base weights nothing trains (reloaded from the base LM, never checkpointed)."""
        return {f"lm.base.{name}" for name, p in self.lm.base.named_parameters() if not p.requires_grad}

    # ------------------------------------------------------------------ conditioning
    def action_weights(self, batch: dict[str, Tensor]) -> tuple[Tensor | None, Tensor | None]:
        """Per-position action weights ``[B, T, k]`` (None for `none`) and the planner logits ``[U, k]``."""
        if self.selection == "none":
            return None, None
        logits = self.planner(batch["plan_context"], batch["plan_context_mask"]) if self.planner is not None else None
        weights = select_weights(
            logits, self.selection, temperature=self.hparams.temperature, training=self.training,
            oracle_actions=batch["plan_action"], sentence_index=batch["plan_position"], num_actions=self.num_actions,
            gumbel_scale=self.hparams.gumbel_scale,
        )
        return weights[batch["token_plan"]], logits

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """LM logits ``[B, T, V]`` and planner logits ``[U, k]`` (None without a planner)."""
        weights, planner_logits = self.action_weights(batch)
        output = self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], action_weights=weights)
        return output.logits, planner_logits

    def _planner_learns(self) -> bool:
        """Whether this step can update the planner (unfrozen, and a loss reaches it)."""
        schedule = self.schedules.get("planner")
        held = schedule is not None and not schedule.trainable
        return not held and any(p.requires_grad for p in self.planner.parameters())

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self.planner is not None:
            # a planner that cannot learn at this step runs deterministically (no dropout)
            self.planner.train(self._planner_learns())
        logits, planner_logits = self(batch)
        nll, count = next_token_nll(logits, batch["labels"])
        loss = global_batch_mean(nll, count, self)
        size = batch["input_ids"].shape[0]
        self.log("train/lm_loss", nll.detach() / count.clamp(min=1), prog_bar=True, batch_size=size)
        if planner_logits is not None:
            planner_nll = F.cross_entropy(planner_logits.float(), batch["plan_action"], reduction="sum")
            targets = torch.tensor(len(batch["plan_action"]), device=planner_nll.device)
            self.log("train/planner_loss", planner_nll.detach() / targets.clamp(min=1), batch_size=size)
            if self.hparams.planner_loss_weight > 0:
                loss = loss + self.hparams.planner_loss_weight * global_batch_mean(planner_nll, targets, self)
        self.log("train/loss", loss, batch_size=size)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits, planner_logits = self(batch)
        nll, count = next_token_nll(logits, batch["labels"])
        if count > 0:
            self.val_nll.update(nll / count, weight=count)  # token-weighted, not window-averaged
        if planner_logits is not None:
            correct = (planner_logits.argmax(-1) == batch["plan_action"]).float()
            self.val_planner_acc.update(correct)

    def on_validation_epoch_end(self) -> None:
        mean_nll = self.val_nll.compute()
        values = {"val/lm_loss": float(mean_nll), "val/ppl": float(torch.exp(mean_nll))}
        self.log("val/lm_loss", mean_nll)
        self.log("val/ppl", torch.exp(mean_nll), prog_bar=True)
        self.val_nll.reset()
        if self.planner is not None:
            accuracy = self.val_planner_acc.compute()
            values["val/planner_acc"] = float(accuracy)
            self.log("val/planner_acc", accuracy, prog_bar=True)
            self.val_planner_acc.reset()
            self._check_forgetting(float(accuracy))
        if not self.trainer.sanity_checking and self.trainer.state.fn == "fit":
            self.best.offer(values["val/lm_loss"], self.global_step, self, self._handed_off_names(), values)
            # the learning curve (val_curve.json): rank 0 writes it, every rank holds the same reduced values
            self.val_curve = [row for row in self.val_curve if row["step"] != self.global_step]
            self.val_curve.append({"step": int(self.global_step), **{k: round(v, 6) for k, v in values.items()}})

    def _handed_off_names(self) -> list[str]:
        """Names of the weights joint training can change (adapters, codebooks, LoRA/base, planner)."""
        trainable = {id(p) for p in [*self.trainable_lm_parameters(), *self.lm.adapter_parameters(),
                                     *self.lm.codebook_parameters(),
                                     *(self.planner.parameters() if self.planner is not None else [])]}
        return [name for name, p in self.named_parameters() if id(p) in trainable]

    def select_export_weights(self) -> tuple[int, dict[str, float]] | None:
        """Load the best-validation weights (see `export_best`): their step and validation metrics,
        or None when the final weights are handed off."""
        if self.hparams.export_best and self.best.step != self.global_step and self.best.restore(self):
            return self.best.step, dict(self.best.metrics)
        return None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["joint_best"] = self.best.to_checkpoint()
        checkpoint["val_curve"] = list(self.val_curve)
        # measured once, on the planner as it came in: a resumed run must not re-measure the tuned one
        checkpoint["planner_acc_start"] = self.planner_acc_start
        state = checkpoint.get("state_dict", {})
        for key in self._frozen_base_keys():
            state.pop(key, None)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.best.load_checkpoint(checkpoint.get("joint_best"))
        self.val_curve = list(checkpoint.get("val_curve", []))
        self.planner_acc_start = checkpoint.get("planner_acc_start")
        missing = set(self.state_dict()) - set(checkpoint.get("state_dict", {})) - self._frozen_base_keys()
        if missing:
            raise UserError(f"the resume checkpoint lacks trained weights ({sorted(missing)[:3]}...); "
                            "delete the stage's checkpoints/ folder and run it again")

    def _check_forgetting(self, accuracy: float) -> None:
        if self.planner_acc_start is None or self.trainer.sanity_checking:
            return
        drop = 100.0 * (self.planner_acc_start - accuracy)
        self.log("val/planner_acc_drop", drop / 100.0)
        if drop > self.hparams.forgetting_warn_drop:
            warnings.warn(
                f"planner accuracy fell from {100 * self.planner_acc_start:.1f}% to {100 * accuracy:.1f}% "
                f"during joint training (the planner is forgetting); consider planner_unfreeze_at, "
                f"planner_loss_weight or a smaller planner_lr", stacklevel=1,
            )

    @torch.no_grad()
    def on_train_start(self) -> None:
        """Before the first step: the residual's hidden-state start (when asked) and the planner's
        validation accuracy (the forgetting baseline)."""
        initialise_residual(self)
        measure_planner_start(self)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the norm of the gradient reaching the planner (zero for `hard`)."""
        if self.planner is None:
            return
        grads = [p.grad.detach().float().norm() for p in self.planner.parameters() if p.grad is not None]
        norm = torch.stack(grads).norm() if grads else torch.zeros((), device=self.device)
        self.log("train/planner_grad_norm", norm, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ optimisation
    def trainable_lm_parameters(self) -> list[nn.Parameter]:
        """LM parameters trained by design (adapters, codebook, and LoRA / full base weights)."""
        return [p for p in self.lm.parameters() if p.requires_grad]

    def has_trainable_parameters(self) -> bool:
        """False only for the plain LM (`none`) with frozen base weights: nothing to fine-tune."""
        return bool(self.trainable_lm_parameters()) or self.planner is not None

    def configure_optimizers(self) -> Any:
        return joint_optimizers(self)

    def configure_callbacks(self) -> list[L.Callback]:
        self.schedules = {}
        if self.planner is not None:
            self.schedules["planner"] = UnfreezeSchedule("planner", lambda module: module.planner.parameters(),
                                                         self.hparams.planner_unfreeze_at)
        if self.selection != "none":
            self.schedules["codebook"] = UnfreezeSchedule("codebook", lambda module: module.lm.codebook_parameters(),
                                                          self.hparams.codebook_unfreeze_at)
        return list(self.schedules.values())
