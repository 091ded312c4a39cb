"""Structure metrics of planner-in-the-loop generations on test documents.

Each chosen test document is cut after its first ``prompt_sentences`` sentences; the model
continues it (with the planner in the loop for planner runs, the constant code for the
fixed/uniform controls, nothing for the plain LM) and the continuation is compared with the
true one: ROUGE-2 F, edit distance between the action sequences (generated text split with the
same splitter, embedded with the same encoder, nearest centroid; true text: its k-means actions),
and plan-following rate (generated sentences whose own action is the one they were written under).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from planner_lm.evaluation.structure import edit_distance, normalized_edit_distance, plan_following_rate, rouge2_f
from planner_lm.generation import PlannerGenerator, SamplingConfig
from planner_lm.generation_plan import Generation
from planner_lm.sentence_vectors import nearest_actions
from planner_lm.sentences import sentence_spans

CONDITIONED_SOURCES = ("planner", "forced", "fixed", "boundary", "position")
"""Plan entries the LM was actually conditioned on, one action each (uniform / none carry none)."""


@dataclass
class StructureTask:
    """Prompts cut from test documents and their true continuations."""

    prompts: list[str]
    references: list[str]
    true_actions: list[list[int]]


def make_task(texts: Sequence[str], spans: Sequence[Sequence[tuple[int, int]]], doc_first: Sequence[int],
              actions: np.ndarray, prompt_sentences: int, max_docs: int) -> StructureTask:
    """The first ``max_docs`` documents with more than ``prompt_sentences`` sentences."""
    task = StructureTask([], [], [])
    for text, doc_spans, first in zip(texts, spans, doc_first):
        if len(task.prompts) >= max_docs:
            break
        if len(doc_spans) <= prompt_sentences:
            continue
        task.prompts.append(text[: doc_spans[prompt_sentences - 1][1]])
        task.references.append(text[doc_spans[prompt_sentences][0]:])
        task.true_actions.append([int(a) for a in actions[first + prompt_sentences: first + len(doc_spans)]])
    return task


class EncodedOnce:
    """A sentence encoder that encodes each distinct text once and then reuses its vector: the
    prompts recur in every run's generations, and generated sentences are encoded while planning
    and again when scored. Holds only the evaluator's texts (prompts and generations)."""

    def __init__(self, encode: Any) -> None:
        self.encode, self.vectors = encode, {}

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        new = list(dict.fromkeys(t for t in texts if t not in self.vectors))
        if new:
            self.vectors.update(zip(new, self.encode(new).float().cpu()))
        return torch.stack([self.vectors[t] for t in texts]) if texts else self.encode([])


class StructureEvaluator:
    """Generates for a task with one model and scores the generations.

    Args:
        task: prompts and true continuations.
        encode: the embed stage's sentence encoder.
        centroids: ``[K, D]`` codebook, to give generated sentences their k-means action.
        sampling: token sampling settings (its ``selection`` is set per run).
        batch_size: prompts generated together.
    """

    def __init__(self, task: StructureTask, encode: Any, centroids: torch.Tensor, sampling: SamplingConfig,
                 batch_size: int = 16) -> None:
        self.task, self.encode, self.centroids = task, EncodedOnce(encode), centroids.float()
        self.sampling, self.batch_size = sampling, batch_size

    def _actions_of(self, texts: list[str]) -> list[int]:
        return nearest_actions(self.encode(texts), self.centroids) if texts else []

    def generate(self, generator: PlannerGenerator, selection: str, planner_temperature: float = 1.0) -> list[Generation]:
        """Continue every prompt, conditioned as ``selection`` with the run's planner temperature."""
        sampling = SamplingConfig(**{**self.sampling.__dict__, "selection": selection,
                                     "planner_temperature": planner_temperature})
        out: list[Generation] = []
        prompts = self.task.prompts
        for start in range(0, len(prompts), self.batch_size):
            out.extend(generator.generate(prompts[start:start + self.batch_size], config=sampling))
        return out

    def score(self, generations: Sequence[Generation]) -> dict[str, float]:
        """Mean ROUGE-2 F, mean (and length-normalised) action edit distance, plan-following rate."""
        rouge = [rouge2_f(g.continuation, ref) for g, ref in zip(generations, self.task.references)]
        # realized action sequence of each continuation, embedded in one batch
        pieces = [[g.continuation[a:b] for a, b in sentence_spans(g.continuation)] for g in generations]
        flat = self._actions_of([p for doc in pieces for p in doc])
        realized, at = [], 0
        for doc in pieces:
            realized.append(flat[at:at + len(doc)])
            at += len(doc)
        edits = [edit_distance(r, t) for r, t in zip(realized, self.task.true_actions)]
        normalized = [normalized_edit_distance(r, t) for r, t in zip(realized, self.task.true_actions)]
        # plan following: complete generated sentences written under one action
        judged = []
        for g in generations:
            sentences = [s for s in g.sentences if not s.in_prompt and s.text]
            if sentences and not g.stopped_at_eos:
                sentences = sentences[:-1]  # cut off by max tokens: unfinished
            judged.extend(s for s in sentences if s.source in CONDITIONED_SOURCES)
        own = self._actions_of([s.text for s in judged])
        follow = plan_following_rate([s.action for s in judged], own)
        return {
            "rouge2": float(np.mean(rouge)) if rouge else float("nan"),
            "edit": float(np.mean(edits)) if edits else float("nan"),
            "edit_normalized": float(np.mean(normalized)) if normalized else float("nan"),
            "follow": follow,
            "judged_sentences": len(judged),
            "docs": len(generations),
            "generated_sentences_per_doc": float(np.mean([len(p) for p in pieces])) if pieces else 0.0,
        }
