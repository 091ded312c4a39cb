"""Data for joint planner + LM fine-tuning: LM windows plus what the planner needs per window.

Reads the upstream stages through their manifests (``0_prepare``, ``1_embed``, ``2_cluster``,
``lm/`` or a hub LM name, ``3_planner``), checks that they fit together before any heavy work,
and exposes the facts the model needs (``num_actions``, ``embedding_dim``, paths) as attributes
that the stage CLI links into the model, so the user never types them.

A batch holds the windows (``input_ids``, ``attention_mask``, ``labels``) and, for the planner,
the batch's DISTINCT target sentences: ``plan_sentence [U]`` (global ids), ``token_plan [B, T]``
(index into them per position), ``plan_context [U, S, D]`` / ``plan_context_mask [U, S]`` (cached
embeddings of the previous sentences), ``plan_action [U]`` (k-means action ids: oracle
selection, planner loss and accuracy) and ``plan_position [U]`` (each sentence's index in its
document: the boundary control). The planner thus runs once per sentence, not per token.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from planner_lm.artifacts import read_manifest
from planner_lm.data.contexts import gather_contexts
from planner_lm.data.lm_windows import LMWindows, TokenizedSplit, check_window, load_or_build_token_cache
from planner_lm.data.resumable import process_of, resumable_train_loader
from planner_lm.errors import UserError
from planner_lm.model_files import pin
from planner_lm.run_folder import PLANNER_DIR, RunFolder, finished

__all__ = ["JointBatchCollator", "JointDataModule"]


@functools.lru_cache(maxsize=4)
def _load_tokenizer(lm_path: str, mtime: float) -> tuple[Any, str]:
    """Tokenizer and fingerprint of a base LM (hashing the whole vocabulary takes seconds: cached)."""
    from planner_lm.tokenization import load_tokenizer, tokenizer_fingerprint

    tokenizer = load_tokenizer(lm_path)
    return tokenizer, tokenizer_fingerprint(tokenizer)


def _mtime(path: str) -> float:
    return Path(path).stat().st_mtime if Path(path).exists() else 0.0


class JointBatchCollator:
    """Stacks windows and adds the per-sentence planner inputs (see module doc)."""

    def __init__(self, embeddings: np.ndarray | None, actions: np.ndarray, doc_first: np.ndarray,
                 context_sentences: int) -> None:
        self.embeddings, self.actions, self.context_sentences = embeddings, actions, context_sentences
        self.doc_first = doc_first

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
        target = batch.pop("target_sentence")
        plan_sentence, token_plan = torch.unique(target, return_inverse=True)
        plan_doc_first = torch.from_numpy(np.asarray(self.doc_first[plan_sentence.numpy()], dtype=np.int64))
        batch["plan_sentence"] = plan_sentence
        batch["token_plan"] = token_plan
        batch["plan_action"] = torch.from_numpy(np.asarray(self.actions[plan_sentence.numpy()], dtype=np.int64))
        batch["plan_position"] = plan_sentence - plan_doc_first
        if self.embeddings is not None:
            context, mask = gather_contexts(self.embeddings, plan_sentence, plan_doc_first, self.context_sentences)
            batch["plan_context"], batch["plan_context_mask"] = context, mask
        return batch


class JointDataModule(L.LightningDataModule):
    """LM windows of the prepared corpus with planner contexts, for `finetune-joint`.

    Args:
        run_dir: run directory holding the upstream stages (0_prepare, 1_embed, 2_cluster, lm, 3_planner).
        lm: base LM: a Hugging Face model directory or hub name; default `<run_dir>/lm` (the
            `pretrain-lm` stage).
        planner_dir: stage directory holding the `planner/` folder; default `<run_dir>/3_planner`.
        needs_planner: whether the planner stage must exist; default (None): use it when its
            manifest exists (selections without a planner never read it). Batches carry planner
            contexts only when the model being trained uses a planner.
        window: tokens per training window (paper: 128).
        stride: tokens between window starts; default `window - 1`, so each token is a label once.
        batch_size: windows per optimizer step over all devices (paper: 32); each of N processes loads 1/N.
        eval_batch_size: windows per validation batch; default `batch_size`.
        num_workers: DataLoader worker processes.
        token_cache_dir: where tokenized splits are cached; default `<run_dir>/tokens` (shared by
            all selections; keyed by the prepared corpus's manifest hash and the tokenizer).
        init_from: warm start: the selection of a finished joint run of this run directory (e.g.
            `pred`) whose LM adapters and codebooks the LM starts from; it must share the base LM,
            k and conditioned layers (the reference starts joint training from its PRED LM).
    """

    def __init__(
        self,
        run_dir: str = "runs/demo",
        lm: str | None = None,
        planner_dir: str | None = None,
        needs_planner: bool | None = None,
        window: int = 128,
        stride: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        token_cache_dir: str | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        check_window(window, stride)
        self.run_dir = Path(run_dir)
        self.window, self.stride = window, stride
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.needs_planner = num_workers, needs_planner
        self.folder = RunFolder(self.run_dir)
        self._read_upstream(lm, planner_dir)
        self.init_from = init_from or None
        self.init_lm_path = self._warm_start_source(init_from)
        self.token_cache_dir = (Path(token_cache_dir) / self.prepared.manifest.hash if token_cache_dir
                                else self.folder.token_cache_dir)
        self._tokenizer: Any = None
        self._windows: dict[str, LMWindows] = {}

    # ------------------------------------------------------------------ upstream hand-offs
    def _read_upstream(self, lm: str | None, planner_dir: str | None) -> None:
        """Validate manifests and collect the facts linked into the model (cheap: no data read)."""
        folder = self.folder
        self.prepared, self.cluster_manifest = folder.prepared, folder.cluster_manifest()
        self.embed_manifest = folder.embed_manifest()
        self.num_actions, self.embedding_dim = folder.num_actions, folder.embedding_dim
        self.codebook_path = str(folder.codebook_path)
        self.inputs: dict[str, Path] = {
            "prepare": self.prepared.dir, "embed": self.embed_manifest.dir, "cluster": self.cluster_manifest.dir,
        }

        # The base LM: our pretrain-lm stage (a manifest to check) or any name load_base_lm knows.
        lm_dir = folder.dir("pretrain_lm") if lm is None else Path(lm)
        # a Hub name is pinned to its current commit: the model, its tokenizer, the manifest and every later
        # load of the saved LM (its config names the base so) get the same files
        self.lm_path = str(lm_dir) if lm is None else pin(lm, "base LM")
        self.lm_name = self.lm_path
        self.expected_tokenizer_fingerprint: str | None = None
        if lm is None or (lm_dir / "manifest.json").is_file():
            lm_manifest = read_manifest(lm_dir, "pretrain_lm")
            self.expected_tokenizer_fingerprint = lm_manifest.fact("tokenizer_fingerprint")
            self.lm_name = str(lm_manifest.facts.get("lm_name", self.lm_path))
            self.inputs["lm"] = lm_manifest.dir

        self.planner_path: str | None = None
        self.context_sentences = 0
        planner_dir_path = Path(planner_dir) if planner_dir else folder.dir("pretrain_planner")
        if self.needs_planner is None:
            self.needs_planner = finished(planner_dir_path)
        if self.needs_planner:
            planner_manifest = folder.check_planner(read_manifest(planner_dir_path, "pretrain_planner"))
            self.context_sentences = int(planner_manifest.fact("context_sentences"))
            self.planner_path = str(planner_manifest.dir / PLANNER_DIR)
            self.inputs["planner"] = planner_manifest.dir

    def _warm_start_source(self, init_from: str | None) -> str | None:
        """The LM folder of the joint run `init_from` (recorded as an input), checked against this base LM."""
        if not init_from:
            return None
        run = self.folder.joint_run(init_from)
        if str(run.manifest.facts.get("lm_name")) != self.lm_name:
            raise UserError(f"--data.init_from {init_from}: {run.dir} was trained on base LM "
                            f"{run.manifest.facts.get('lm_name')!r}, not {self.lm_name!r}; warm-start from a run of this base")
        self.inputs["init"] = run.dir
        return str(run.lm_dir)

    @property
    def tokenizer(self) -> Any:
        """The base LM's tokenizer, checked against the fingerprint recorded by `pretrain-lm`."""
        if self._tokenizer is None:
            tokenizer, fingerprint = _load_tokenizer(self.lm_path, _mtime(self.lm_path))
            if self.expected_tokenizer_fingerprint not in (None, fingerprint):
                raise UserError(
                    f"the tokenizer in {self.lm_path} is not the one its manifest records; re-run `make pretrain-lm`"
                )
            self._tokenizer, self.tokenizer_fingerprint = tokenizer, fingerprint
        return self._tokenizer

    @property
    def pad_token_id(self) -> int:
        tokenizer = self.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return int(pad or 0)

    def _tokens(self, split: str) -> TokenizedSplit:
        """The split's token cache, keyed by the prepared corpus AND the tokenizer."""
        tokenizer = self.tokenizer
        return load_or_build_token_cache(self.prepared.split(split), tokenizer, self.token_cache_dir, split,
                                         self.tokenizer_fingerprint)

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Tokenize each split once (rank 0); later runs and other selections reuse the cache."""
        for split in ("train", "val"):
            self._tokens(split)

    def setup(self, stage: str | None = None) -> None:
        for split in ("train", "val"):
            if split not in self._windows:
                self._windows[split] = LMWindows(self._tokens(split), self.window, self.stride, self.pad_token_id)
                if len(self._windows[split]) == 0:
                    raise UserError(f"the {split} split has no documents with at least two tokens; prepare a larger corpus")
        embeddings = None
        model = self.trainer.lightning_module if self.trainer is not None else None
        if self.needs_planner and getattr(model, "uses_planner", True):
            embeddings = self.folder.embeddings()
        self.collate = JointBatchCollator(embeddings, self.folder.actions(), self.folder.doc_first,
                                          self.context_sentences)

    def train_dataloader(self) -> DataLoader:
        return resumable_train_loader(self._windows["train"], self.batch_size, None, collate_fn=self.collate,
                                      num_workers=self.num_workers, process=process_of(self))

    def ordered_train_loader(self) -> DataLoader:
        """The training windows in corpus order, unshuffled: for statistics taken before training
        (its own loader, so the resumable training order is untouched)."""
        return DataLoader(self._windows["train"], batch_size=self.batch_size, shuffle=False, collate_fn=self.collate)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._windows["val"], batch_size=self.eval_batch_size, shuffle=False, collate_fn=self.collate,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
