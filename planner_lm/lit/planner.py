"""Lightning wrapper of the planner: next-action cross-entropy, metrics, optimizer, hand-off.

Metrics (TensorBoard, `train/...` per step and `val/...` per validation run): `loss`/`nll`
(cross-entropy in nats), `top1`, `top5` (accuracy), `mean_rank` (1 = the true action got the
highest logit). Next to them, `val/baseline_*`: accuracies of content-free predictors
(majority action, previous sentence's action, action bigram) computed by the data module, so the
reader sees whether the planner learned more than action frequencies.
"""
from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from planner_lm.lit.best_weights import BestWeights
from planner_lm.models.planner import DEFAULT_CONTEXT_SENTENCES, Planner


class TrueActionRank(MeanMetric):
    """Mean rank of the true action among the k logits (1 = ranked first)."""

    def update(self, logits: Tensor, target: Tensor) -> None:  # type: ignore[override]
        true_logit = logits.gather(1, target[:, None])
        super().update((logits > true_logit).sum(1).float() + 1.0)


def _metrics(num_actions: int, prefix: str) -> MetricCollection:
    top = min(5, num_actions)
    return MetricCollection(
        {
            "top1": MulticlassAccuracy(num_actions, top_k=1, average="micro"),
            f"top{top}": MulticlassAccuracy(num_actions, top_k=top, average="micro"),
            "mean_rank": TrueActionRank(),
        },
        prefix=prefix,
    )


class PlannerModule(L.LightningModule):
    """Trains `Planner` to predict the next sentence's action (paper: Adam 1e-4, wd 1e-4).

    Args:
        embedding_dim: sentence embedding size; linked from the embed stage, not set by hand.
        num_actions: number of actions k; linked from the cluster stage, not set by hand.
        centroids: the k-means codebook `[k, dim]` that initialises the policy head; linked from
            the cluster stage.
        context_sentences: previous sentences the planner sees (S); linked from data.context_sentences.
        model_dim: transformer width; default = embedding_dim.
        num_layers: transformer encoder layers (paper: 1).
        num_heads: attention heads (paper: 2).
        ffn_dim: feed-forward size of each layer (paper: 2048).
        dropout: dropout inside the encoder layers.
        pooling: read the context out as a mean over all context sentences (`mean`, the
            reference) or at the previous sentence (`last`).
        lr: Adam learning rate (paper: 1e-4).
        weight_decay: L2 penalty added by Adam, as in the paper (not decoupled AdamW).
        init_head_from_centroids: start the policy head as the k-means codebook (paper: yes).
        export_best: hand off the weights of the validation with the lowest NLL (paper: best
            checkpoint by validation loss) rather than the final ones.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_actions: int,
        centroids: Tensor | None = None,
        context_sentences: int = DEFAULT_CONTEXT_SENTENCES,
        model_dim: int | None = None,
        num_layers: int = 1,
        num_heads: int = 2,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        pooling: Literal["mean", "last"] = "mean",
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        init_head_from_centroids: bool = True,
        export_best: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["centroids"])
        self.planner = Planner(
            embedding_dim=embedding_dim,
            num_actions=num_actions,
            context_sentences=context_sentences,
            model_dim=model_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            ffn_dim=ffn_dim,
            dropout=dropout,
            pooling=pooling,
        )
        if init_head_from_centroids and centroids is not None:
            self.planner.init_head_from_centroids(centroids)
        self.train_metrics = _metrics(num_actions, "train/")
        self.val_metrics = _metrics(num_actions, "val/")
        self.val_nll = MeanMetric()
        self.baselines: dict[str, float] = {}
        self.best = BestWeights()

    def forward(self, context: Tensor, mask: Tensor) -> Tensor:
        return self.planner(context, mask)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self.planner(batch["context"], batch["mask"])
        loss = F.cross_entropy(logits, batch["target"])
        batch_values = self.train_metrics(logits.detach(), batch["target"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        self.log_dict(batch_values, batch_size=len(logits))
        return loss

    def on_train_epoch_end(self) -> None:
        self.train_metrics.reset()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self.planner(batch["context"], batch["mask"])
        nll = F.cross_entropy(logits, batch["target"], reduction="none")
        self.val_nll.update(nll)
        self.val_metrics.update(logits, batch["target"])

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        values["val/nll"] = self.val_nll.compute()
        self.val_metrics.reset()
        self.val_nll.reset()
        if not self.trainer.sanity_checking and self.trainer.state.fn == "fit":
            self.best.offer(float(values["val/nll"]), self.global_step, self.planner)
        datamodule = getattr(self.trainer, "datamodule", None)
        self.baselines = dict(getattr(datamodule, "baselines", {}) or {})
        for name, value in self.baselines.items():
            values[f"val/baseline_{name}"] = torch.tensor(value)
        # already reduced across devices by torchmetrics; sync_dist averages identical values
        self.log("val/top1", values.pop("val/top1"), prog_bar=True, sync_dist=True)
        self.log_dict(values, sync_dist=True)

    def select_export_weights(self) -> int:
        """Load the weights to hand off (see `export_best`); returns the step they come from."""
        if self.hparams.export_best and self.best.restore(self.planner):
            return self.best.step
        return int(self.global_step)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.planner.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["planner_config"] = dict(self.planner.config)
        checkpoint["planner_best"] = self.best.to_checkpoint()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of a planner with another shape (e.g. k changed since)."""
        saved = checkpoint.get("planner_config")
        if saved is not None and saved != self.planner.config:
            from planner_lm.errors import UserError

            diff = {k: (saved.get(k), v) for k, v in self.planner.config.items() if saved.get(k) != v}
            raise UserError(
                f"the checkpoint to resume was trained with a different planner ({diff}, as saved vs now); "
                "pass --overwrite true (make: OVERWRITE=1) to start over"
            )
        self.best.load_checkpoint(checkpoint.get("planner_best"))
