"""Sentence embedding as a Lightning predict loop with a frozen sentence-transformers encoder.

`SentenceEmbedder.predict_step` tokenizes and encodes one length-sorted batch and returns
unit-norm float16 vectors; `ShardWriter` (a `BasePredictionWriter`) collects them per shard and
writes each finished shard atomically, on whichever rank produced it. Multi-GPU / multi-node and
bf16 autocast are Trainer flags (`--trainer.devices`, `--trainer.strategy`, `--trainer.precision`).
The default precision (`planner_lm.hardware.fast_precision`) is bf16 autocast where the hardware has native bf16.
`consolidate_shards` assembles `embeddings.npy` (row = global sentence id) at the end.
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import BasePredictionWriter
from tqdm.auto import tqdm

from planner_lm.artifacts import atomic_save_npy
from planner_lm.data.embed_data import EmbedPlan, shard_path
from planner_lm.errors import UserError
from planner_lm.sentence_vectors import encode_batch, load_encoder, pinned_encoder, resolve_embed_backend

# Shards are identified by the batch itself, not by sampler indices, so Lightning's guess is not needed.
warnings.filterwarnings("ignore", message=".*Couldn't infer the batch indices fetched from your dataloader.*")


class SentenceEmbedder(LightningModule):
    """Frozen sentence encoder; `predict_step` returns unit-norm float16 vectors of a batch.

    Args:
        encoder: a bundled encoder (``all-MiniLM-L6-v2``, offline), a local sentence-transformers
            folder, or a Hugging Face Hub name such as ``sentence-transformers/all-mpnet-base-v2``
            (the papers' encoder; needs network access the first time).
        max_seq_length: truncate sentences to this many tokens (None = the encoder's own limit).
        backend: where the network runs: ``torch``, ``onnx`` (ONNX Runtime, extra ``[onnx]``),
            ``openvino`` (extra ``[openvino]``), or ``auto``: torch (bf16 autocast) on GPUs and
            native-bf16 CPUs, elsewhere the fastest installed runtime that meets the fidelity bar
            as measured by ``bench/bench_embed.py`` (ONNX Runtime int8, then OpenVINO fp32; see
            `planner_lm.sentence_vectors.resolve_embed_backend`). The manifest records the one used, and
            evaluation/generation encode new text with it.
        quantize: int8 dynamic quantization of the weights (ONNX Runtime only): true asks for it,
            false rules it out, null (default) lets ``backend: auto`` decide.
    """

    def __init__(self, encoder: str = "all-MiniLM-L6-v2", max_seq_length: int | None = None,
                 backend: str = "auto", quantize: bool | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.hparams.encoder = encoder = pinned_encoder(encoder)  # what the manifest records and later stages load
        if max_seq_length is not None and max_seq_length < 1:
            raise UserError(f"model.max_seq_length must be >= 1, got {max_seq_length}")
        self.backend, self.quantize = resolve_embed_backend(backend, "cuda" if torch.cuda.is_available() else "cpu", quantize)
        self.encoder = load_encoder(encoder, max_seq_length=max_seq_length, backend=self.backend,
                                    quantize=self.quantize)

    def on_predict_start(self) -> None:
        if self.backend == "openvino":  # OpenVINO computes in bf16 where the Trainer's precision says so
            self.encoder.set_precision(str(self.trainer.precision))

    @property
    def embedding_dim(self) -> int:
        dim = self.encoder.get_sentence_embedding_dimension()
        if dim is None:  # some models only know it after a forward pass
            dim = int(self.embed(["dimension probe"]).shape[1])
        return int(dim)

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm float32 vectors [len(texts), dim] (the one encoding path, `planner_lm.sentence_vectors`)."""
        return encode_batch(self.encoder, texts, self.device)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        vectors = self.embed(batch["texts"])
        return {"shard": batch["shard"], "shard_size": batch["shard_size"], "batch": batch["batch"],
                "vectors": vectors.to(torch.float16).cpu()}


class ShardWriter(BasePredictionWriter):
    """Collects predicted batches per shard and writes each complete shard atomically.

    A shard file holds the vectors of its batches in plan order, so its rows follow
    `EmbedPlan.ids_of_shard`. Files appear only by rename: a killed run leaves complete shards
    (reused on restart) and at most a stray temporary file (ignored).
    """

    def __init__(self, shard_dir: str | Path) -> None:
        super().__init__(write_interval="batch")
        self.shard_dir = Path(shard_dir)
        self._pending: dict[int, dict[int, torch.Tensor]] = defaultdict(dict)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        shard = int(prediction["shard"])
        self._pending[shard][int(prediction["batch"])] = prediction["vectors"]
        if len(self._pending[shard]) == int(prediction["shard_size"]):
            parts = self._pending.pop(shard)
            vectors = torch.cat([parts[b] for b in sorted(parts)]).numpy()
            atomic_save_npy(shard_path(self.shard_dir, shard), vectors)


def consolidate_shards(shard_dir: Path, plan: EmbedPlan, num_sentences: int, out_path: Path) -> int:
    """Assemble all shards into `out_path` (float16 [num_sentences, dim], row = sentence id).

    Written through a memory-mapped temporary file then renamed, so memory stays bounded and a
    reader never sees a partial file. Returns the embedding dimension.
    """
    missing = [s for s in range(plan.num_shards) if not shard_path(shard_dir, s).is_file()]
    if missing:
        raise UserError(f"{len(missing)} of {plan.num_shards} embedding shards are missing in {shard_dir} "
                        f"(a rank failed?); re-run `make embed` to finish them")
    dim = int(np.load(shard_path(shard_dir, 0), mmap_mode="r").shape[1])
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(num_sentences, dim))
    covered = np.zeros(num_sentences, dtype=bool)
    for shard in tqdm(range(plan.num_shards), desc="consolidating shards", unit="shard", leave=False):
        ids = plan.ids_of_shard(shard)
        vectors = np.load(shard_path(shard_dir, shard))
        if vectors.shape != (len(ids), dim):
            raise UserError(f"{shard_path(shard_dir, shard)} has shape {vectors.shape}, expected "
                            f"{(len(ids), dim)}; delete it and re-run `make embed`")
        out[ids] = vectors
        covered[ids] = True
    if not covered.all():
        raise RuntimeError(f"the embedding plan misses {int((~covered).sum())} sentences")
    out.flush()
    del out
    os.replace(tmp, out_path)
    return dim
