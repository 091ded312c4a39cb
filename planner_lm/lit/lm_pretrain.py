"""Lightning module of `pretrain-lm`: a GPT-2-architecture LM trained from scratch.

Offline there is no pretrained GPT-2 to download, so the demo trains a small one on the train
split, with GPT-2's real tokenizer, and hands it on as a standard Hugging Face directory that
plays GPT-2's role in every later stage.

Metrics: `train/loss` (next-token cross-entropy, nats), `train/ppl`, `val/loss` and `val/ppl`
(token-weighted over all validation windows, per-document windows as in every later stage),
`train/lr`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchmetrics import MeanMetric
from transformers import GPT2LMHeadModel

from planner_lm.lit.losses import global_batch_mean, next_token_nll
from planner_lm.lit.schedules import warmup_cosine
from planner_lm.models.base_lm import gpt2_config
from planner_lm.tokenization import GPT2_VOCAB_SIZE

__all__ = ["CausalLMPretrainModule"]


class CausalLMPretrainModule(L.LightningModule):
    """GPT-2 architecture trained from scratch (AdamW, linear warm-up, cosine decay).

    Args:
        vocab_size: tokenizer size; linked from the data module, not set by hand.
        bos_token_id: document-start token; linked from the data module.
        eos_token_id: end-of-text token; linked from the data module.
        n_layer: transformer blocks (GPT-2 small: 12).
        n_embd: hidden width (GPT-2 small: 768).
        n_head: attention heads; must divide n_embd.
        n_positions: longest context the model can take (positions beyond the training window
            stay untrained); must be >= data.window.
        dropout: dropout on embeddings, attention and residuals.
        lr: peak AdamW learning rate.
        weight_decay: decoupled weight decay on matrices (not on biases, norms or positions).
        warmup_steps: linear warm-up steps from 0 to `lr`.
        min_lr_ratio: the cosine decay ends at `lr * min_lr_ratio` on the last step.
    """

    def __init__(
        self,
        vocab_size: int = GPT2_VOCAB_SIZE,
        bos_token_id: int = GPT2_VOCAB_SIZE - 1,
        eos_token_id: int = GPT2_VOCAB_SIZE - 1,
        n_layer: int = 4,
        n_embd: int = 256,
        n_head: int = 4,
        n_positions: int = 1024,
        dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = gpt2_config(
            vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
            dropout=dropout, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        )
        self.lm = GPT2LMHeadModel(self.config)
        self.val_nll = MeanMetric()

    @property
    def num_parameters(self) -> int:
        """Distinct parameters (tied input/output embeddings counted once)."""
        return sum(p.numel() for p in self.lm.parameters())

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        window = getattr(datamodule, "window", None)
        if window is not None and window > self.hparams.n_positions:
            from planner_lm.errors import UserError

            raise UserError(f"model.n_positions ({self.hparams.n_positions}) is shorter than "
                            f"data.window ({window}); raise n_positions")

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        total, count = next_token_nll(logits, batch["labels"])
        mean = total.detach() / count.clamp(min=1)  # this process's tokens, for the logs
        self.log("train/loss", mean, prog_bar=True, batch_size=len(logits))
        self.log("train/ppl", torch.exp(mean), batch_size=len(logits))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=len(logits))
        return global_batch_mean(total, count, self)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        total, count = next_token_nll(logits, batch["labels"])
        if count > 0:
            self.val_nll.update(total / count, weight=count)

    def on_validation_epoch_end(self) -> None:
        if self.val_nll.update_count == 0:
            return
        nll = self.val_nll.compute()
        self.val_nll.reset()
        # the metric is already reduced over ranks: every rank logs the same value
        self.log("val/loss", nll, sync_dist=True)
        self.log("val/ppl", torch.exp(nll), prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for name, param in self.lm.named_parameters():
            (decay if param.ndim >= 2 and "wpe" not in name else no_decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr, betas=(0.9, 0.95),
        )
        scheduler = warmup_cosine(self, optimizer, self.hparams.warmup_steps, self.hparams.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def export(self, out_dir: str | Path, tokenizer: Any) -> list[str]:
        """Write the model and tokenizer as a standard Hugging Face directory; return the files."""
        out_dir = Path(out_dir)
        self.lm.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        return sorted(p.name for p in out_dir.iterdir() if p.is_file() and p.name != "manifest.json")
