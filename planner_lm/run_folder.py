"""The run folder: where each stage of a run keeps its outputs, and the facts that tie them together.

A run directory (`make RUN=...`) holds one sub-directory per stage (layout in docs/DEVELOPING.md).
This is the only module that spells those directory and file names. Every stage, evaluation and
generation open their upstream artefacts through `RunFolder`: it validates each manifest once,
checks the cross-stage facts (sentence counts, embedding dimension, k, which embedding run a
codebook and a planner were built from) and hands out typed access to embeddings, actions,
codebook, document starts, the token cache and the joint runs by selection.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from planner_lm.artifacts import MANIFEST, Manifest, read_manifest
from planner_lm.errors import UserError
from planner_lm.models.planner import CONFIG_FILE as _PLANNER_CONFIG
from planner_lm.models.planner import PLANNER_DIR  # 3_planner and 4_joint-*: the planner folder
from planner_lm.models.selection import RUN_ORDER

STAGE_DIRS: dict[str, str] = {
    "prepare": "0_prepare",
    "embed": "1_embed",
    "cluster": "2_cluster",
    "pretrain_lm": "lm",
    "pretrain_planner": "3_planner",
    "evaluate": "5_eval",
}
"""stage -> its directory inside the run directory (joint runs: `JOINT_PREFIX + selection`)."""

JOINT_PREFIX = "4_joint-"
EMBEDDINGS_FILE = "embeddings.npy"  # 1_embed: float16 [num_sentences, dim], row = global sentence id
CENTROIDS_FILE = "centroids.npy"  # 2_cluster: float32 [k, dim], the codebook of writing actions
ACTIONS_FILE = "actions.npy"  # 2_cluster: int32 [num_sentences], the action of every sentence
JOINT_LM_DIR = "lm"  # 4_joint-*: the conditioned LM (and its tokenizer)
VAL_CURVE_FILE = "val_curve.json"  # 4_joint-*: [{step, val/ppl, val/lm_loss, ...}] of every validation in training
HUB_DIR = "hub"  # 4_joint-*: shareable copies with model cards (`planner_lm.publish`)
TOKEN_CACHE_DIR = "tokens"  # tokenized splits, shared by every stage that reads tokens
WORK_DIRS = ("checkpoints", "tb")  # every Lightning stage: resume checkpoints and TensorBoard events
UNFINISHED_FILES: dict[str, tuple[str, ...]] = {
    "prepare": ("train", "val", "test", "train.tmp", "val.tmp", "test.tmp"),
    "embed": ("shards", EMBEDDINGS_FILE),
    "cluster": (CENTROIDS_FILE, ACTIONS_FILE, "report"),
    "pretrain_lm": ("*.json", "*.safetensors", "merges.txt", "*.jinja", "*.model"),
    "pretrain_planner": (PLANNER_DIR,),
    "finetune_joint": (VAL_CURVE_FILE, JOINT_LM_DIR, PLANNER_DIR),
    "evaluate": ("corpus", "metrics.json", "results.md", "*.png", "generations.jsonl"),
}
"""stage -> names (patterns) of what it may write at its folder's top level before its manifest: an
interrupted run's own files (`planner_lm.ownership.foreign_files`; a finished stage's manifest lists its files)."""
_TOKENIZER_MARKER = "tokenizer_config.json"


def stage_dir(run_dir: str | os.PathLike, stage: str, selection: str | None = None) -> Path:
    """The directory of `stage` inside `run_dir`; joint runs (`finetune_joint`) need their selection."""
    if stage == "finetune_joint":
        if selection is None:
            raise ValueError("the finetune_joint directory depends on the selection")
        return Path(run_dir) / f"{JOINT_PREFIX}{selection}"
    return Path(run_dir) / STAGE_DIRS[stage]


def finished(directory: Path) -> bool:
    """Whether a stage directory holds a manifest (its stage finished)."""
    return (directory / MANIFEST).is_file()


@dataclass
class JointRun:
    """A finished `4_joint-<selection>` directory."""

    selection: str
    dir: Path
    manifest: Manifest

    @property
    def lm_dir(self) -> Path:
        return self.dir / JOINT_LM_DIR

    @property
    def planner_path(self) -> Path | None:
        """The planner this run tuned (None for selections that do not use one)."""
        path = self.dir / PLANNER_DIR
        return path if (path / _PLANNER_CONFIG).is_file() else None

    @property
    def val_curve_path(self) -> Path:
        return self.dir / VAL_CURVE_FILE

    def val_curve(self) -> list[dict[str, float]]:
        """Validation metrics by training step (empty for runs that never validated during training)."""
        path = self.val_curve_path
        return json.loads(path.read_text()) if path.is_file() else []

    @property
    def steps(self) -> int | None:
        """Optimizer steps this run trained (None when its manifest does not say)."""
        steps = self.manifest.metrics.get("steps")
        return None if steps is None else int(steps)

    @property
    def total_steps(self) -> int | None:
        """Optimizer steps from the run's initialisation: its own, plus, for a warm start, its
        source's total (fact `total_steps`; for runs saved before it was recorded, summed through
        the `init_from` run beside it). Equal budgets compare equal totals, not equal own steps."""
        recorded = self.manifest.facts.get("total_steps")
        if recorded is not None:
            return int(recorded)
        init = self.manifest.facts.get("init_from")
        if not init or self.steps is None:
            return self.steps
        source = self.dir.with_name(f"{JOINT_PREFIX}{init}")
        if not finished(source):
            return None
        before = JointRun(init, source, read_manifest(source, "finetune_joint")).total_steps
        return None if before is None else before + self.steps

    @property
    def hub_dir(self) -> Path:
        """Where `planner_lm.publish` saves the shareable copies (`lm/`, `planner/`)."""
        return self.dir / HUB_DIR

    @property
    def planner_temperature(self) -> float:
        """The planner softmax temperature the run was trained with (evaluate and generate use it)."""
        return float(self.manifest.config.get("model.temperature", 1.0))


class RunFolder:
    """Typed, validated access to the stages of one run directory (manifests are read once)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.root = Path(run_dir)
        self._manifests: dict[str, Manifest] = {}
        self._checked: dict[str, Manifest] = {}  # manifests whose cross-stage checks passed

    # ------------------------------------------------------------------ directories
    def dir(self, stage: str, selection: str | None = None) -> Path:
        return stage_dir(self.root, stage, selection)

    def eval_dir(self, corpus: str | None = None) -> Path:
        """`5_eval` for the run's test split, `5_eval-<corpus>` for another corpus."""
        base = self.dir("evaluate")
        return base if corpus is None else base.with_name(f"{base.name}-{corpus}")

    def seed_dir(self, seed: int) -> Path:
        """`seed-<seed>`: the same run trained again with another `seed_everything`, its upstream stages
        linked (`make demo SEEDS=N`: the planner and compared runs; `NULL_SEED=<seed>`: `fixed` only)."""
        return self.root / f"seed-{seed}"

    def has(self, stage: str) -> bool:
        """Whether `stage` finished in this run (its manifest exists)."""
        return finished(self.dir(stage))

    def manifest(self, stage: str) -> Manifest:
        """The validated manifest of a finished stage (or a UserError naming the make target)."""
        if stage not in self._manifests:
            self._manifests[stage] = read_manifest(self.dir(stage), stage)
        return self._manifests[stage]

    @cached_property
    def prepared(self):  # -> PreparedCorpus (imported lazily: it pulls in `datasets`)
        from planner_lm.prepared import PreparedCorpus

        return PreparedCorpus(self.dir("prepare"))

    @property
    def token_cache_dir(self) -> Path:
        """Tokenized splits of this prepared corpus (keyed further by tokenizer inside)."""
        return self.root / TOKEN_CACHE_DIR / self.prepared.manifest.hash

    # ------------------------------------------------------------------ embeddings and codebook
    def embed_manifest(self) -> Manifest:
        """1_embed, checked against 0_prepare (same sentences, built from this corpus; checked once)."""
        if "embed" in self._checked:
            return self._checked["embed"]
        embed = self.manifest("embed")
        embed.check_built_from("prepare", self.prepared.manifest)
        embed.require("num_sentences", self.prepared.num_sentences, "sentence embeddings vs prepared corpus")
        self._checked["embed"] = embed
        return embed

    def cluster_manifest(self) -> Manifest:
        """2_cluster, checked against 1_embed and 0_prepare: the one cross-stage check of the codebook
        (done once per reader)."""
        if "cluster" in self._checked:
            return self._checked["cluster"]
        embed = self.embed_manifest()
        cluster = self.manifest("cluster")
        cluster.require("embedding_dim", int(embed.fact("embedding_dim")), "codebook vs sentence embeddings")
        cluster.require("num_sentences", int(embed.fact("num_sentences")), "actions vs sentence embeddings")
        cluster.check_built_from("embed", embed)
        self._checked["cluster"] = cluster
        return cluster

    @property
    def num_actions(self) -> int:
        return int(self.cluster_manifest().fact("num_actions"))

    @property
    def embedding_dim(self) -> int:
        return int(self.embed_manifest().fact("embedding_dim"))

    @property
    def embeddings_path(self) -> Path:
        return self.dir("embed") / EMBEDDINGS_FILE

    @property
    def codebook_path(self) -> Path:
        return self.dir("cluster") / CENTROIDS_FILE

    @property
    def actions_path(self) -> Path:
        return self.dir("cluster") / ACTIONS_FILE

    def embeddings(self) -> np.ndarray:
        """Sentence vectors, memory-mapped (float16 [num_sentences, dim])."""
        return np.load(self.embed_manifest().dir / EMBEDDINGS_FILE, mmap_mode="r")

    def actions(self) -> np.ndarray:
        """The action of every sentence, memory-mapped (int32 [num_sentences])."""
        return np.load(self.cluster_manifest().dir / ACTIONS_FILE, mmap_mode="r")

    def codebook(self) -> np.ndarray:
        """The k-means centroids, float32 [k, dim]."""
        return np.load(self.cluster_manifest().dir / CENTROIDS_FILE).astype(np.float32, copy=False)

    def encoder_settings(self) -> dict[str, Any]:
        """How the embed stage encoded sentences: the one recipe every later encoder must follow."""
        embed = self.embed_manifest()
        return {"encoder": str(embed.fact("encoder")), "max_seq_length": embed.facts.get("max_seq_length"),
                "precision": str(embed.metrics.get("precision", "32-true")),
                "backend": str(embed.facts.get("backend", "torch")), "quantize": bool(embed.facts.get("quantize", False))}

    @cached_property
    def doc_first(self) -> np.ndarray:
        """For every global sentence id, the id of its document's first sentence."""
        return self.prepared.sentence_doc_first

    # ------------------------------------------------------------------ planner
    def pretrained_planner(self, required: bool = False) -> Manifest | None:
        """3_planner checked against the codebook, or None when it never ran (and is not required)."""
        if not required and not self.has("pretrain_planner"):
            return None
        return self.check_planner(self.manifest("pretrain_planner"))

    def check_planner(self, planner: Manifest) -> Manifest:
        """Refuse a planner made for another codebook (other k, dimension, or k-means run)."""
        cluster = self.cluster_manifest()
        planner.require("num_actions", int(cluster.fact("num_actions")), "planner vs codebook")
        planner.require("embedding_dim", int(cluster.fact("embedding_dim")), "planner vs sentence embeddings")
        planner.check_built_from("cluster", cluster)
        return planner

    def planner_path_for(self, run: JointRun) -> Path | None:
        """The planner a joint run's generations use: its own, else the pretrained one."""
        if run.planner_path is not None:
            return run.planner_path
        pretrained = self.pretrained_planner()
        return None if pretrained is None else pretrained.dir / PLANNER_DIR

    # ------------------------------------------------------------------ joint runs
    def joint_run(self, selection: str) -> JointRun:
        """The finished `4_joint-<selection>`, checked against the codebook."""
        directory = self.dir("finetune_joint", selection)
        if not finished(directory):
            done = ", ".join(self.finished_selections())
            raise UserError(f"{directory} is not a finished joint run{f' (finished: {done})' if done else ''}; "
                            "run `make finetune-joint` (or `make baselines`), or choose another SELECTION")
        manifest = read_manifest(directory, "finetune_joint")
        manifest.require("num_actions", self.num_actions, f"{directory.name} vs codebook")
        return JointRun(selection, directory, manifest)

    def selections(self) -> list[str]:
        """Selections that have a joint-run directory, finished or not."""
        return sorted(p.name[len(JOINT_PREFIX):] for p in self.root.glob(f"{JOINT_PREFIX}*") if p.is_dir())

    def finished_selections(self) -> list[str]:
        return [s for s in self.selections() if finished(self.dir("finetune_joint", s))]

    def joint_runs(self, wanted: list[str] | None = None) -> list[JointRun]:
        """Finished joint runs in the table's order: all of them, or the `wanted` selections."""
        if wanted is not None:
            missing = [s for s in wanted if not finished(self.dir("finetune_joint", s))]
            if missing:
                raise UserError(f"no finished run for selection(s) {', '.join(missing)} in {self.root}; run "
                                "`make finetune-joint` (soft) / `make baselines`, or drop them from --runs")
            chosen = list(wanted)
        else:
            chosen = self.finished_selections()
            for selection in sorted(set(self.selections()) - set(chosen)):
                print(f"skipping {self.dir('finetune_joint', selection)}: unfinished (no {MANIFEST})")
        if not chosen:
            raise UserError(f"{self.root} holds no finished {JOINT_PREFIX}* run; "
                            "run `make finetune-joint` and `make baselines` first")
        rank = {name: i for i, name in enumerate(RUN_ORDER)}
        runs = [self.joint_run(s) for s in sorted(set(chosen), key=lambda s: (rank.get(s, len(rank)), s))]
        fingerprints = {r.manifest.facts.get("tokenizer_fingerprint") for r in runs} - {None}
        if len(fingerprints) > 1:
            raise UserError(f"the runs in {self.root} use different tokenizers; re-run `make finetune-joint baselines`")
        return runs

    def tokenizer_dir(self, run: JointRun) -> Path:
        """Where a joint run's tokenizer lives: saved next to its LM, else the run's own pretrained LM."""
        return run.lm_dir if (run.lm_dir / _TOKENIZER_MARKER).is_file() else self.dir("pretrain_lm")
