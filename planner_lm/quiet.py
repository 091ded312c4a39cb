"""Upstream messages that every stage would print and that tell our users nothing: dropped here, in
one place, each with the reason. Messages our own code caused are fixed where they arise instead
(e.g. `ResumeCheckpoint` passes `weights_only=False` to `save_checkpoint`).

Called by every command line (`planner_lm.cli`); it filters by exact message, so any other warning
from these libraries still shows.
"""
from __future__ import annotations

import logging
import os
import warnings

ENVIRONMENT = {
    # jsonargparse announces its own upcoming API changes on every parse; they concern our code, not users
    "JSONARGPARSE_DEPRECATION_WARNINGS": "off",
}

WARNINGS = (
    # Lightning (2.6) builds `torch.utils._pytree.LeafSpec` to flatten the dataloaders of every fit,
    # which recent torch deprecates: Lightning's to change, nothing our users can do about it.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)

LOG_RECORDS = {
    # Lightning logs an advert for its cloud logging service ("Tip: ...") on every Trainer, lines
    # about accelerators this host does not have, and restates `val_check_interval: 1.0` (the
    # presets' "validate once per epoch") as a notice.
    "lightning.pytorch.utilities.rank_zero": ("Tip:", "TPU available: False", "HPU available: False",
                                              "validation will run at the end of the training epoch"),
    "lightning.pytorch.trainer.connectors.logger_connector.logger_connector": ("Tip:",),
    # ONNX Runtime's quantizer advises a pre-processing pass we skip on purpose (the int8 encoder's
    # fidelity is measured without it, bench/bench_embed.py); it logs on the root logger.
    "": ("Please consider to run pre-processing before quantization",),
}
"""logger name -> parts of the messages to drop."""


class _Drop(logging.Filter):
    def __init__(self, parts: tuple[str, ...]) -> None:
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.getMessage())
        return not any(part in message for part in self.parts)


_installed = False


def quiet_upstream() -> None:
    """Install the filters above (once per process)."""
    global _installed
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    if _installed:
        return
    _installed = True
    for message, category in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, parts in LOG_RECORDS.items():
        logging.getLogger(name).addFilter(_Drop(parts))
