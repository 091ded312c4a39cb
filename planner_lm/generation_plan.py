"""What a generation returns and how a person reads it: the text with each sentence's action,
and what an action means (the training sentences nearest to its centroid)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class PlannedSentence:
    """One sentence of the output and the action it was written under."""

    text: str
    action: int
    probability: float  # planner probability of ``action`` (NaN without a planner)
    source: str  # "planner", "forced", or the planner-free control: "fixed", "uniform", "none"
    in_prompt: bool = False  # the sentence lies entirely in the prompt
    examples: list[str] = field(default_factory=list)


@dataclass
class Generation:
    """The result for one prompt: the continuation and the plan, sentence by sentence."""

    prompt: str
    continuation: str
    sentences: list[PlannedSentence]
    new_tokens: int
    stopped_at_eos: bool

    @property
    def text(self) -> str:
        return self.prompt + self.continuation

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "text": self.text}


class ActionExamples:
    """The sentences of an action's cluster nearest to its centroid (computed on demand).

    Args:
        texts: sentence strings, indexed like ``actions`` and ``embeddings``.
        embeddings: ``[N, D]`` sentence vectors (a memory map is fine).
        actions: ``[N]`` k-means id per sentence.
        centroids: ``[K, D]`` codebook.
        per_action: how many examples to return.
    """

    def __init__(self, texts: Sequence[str], embeddings: np.ndarray, actions: np.ndarray,
                 centroids: np.ndarray, per_action: int = 3) -> None:
        self.texts, self.embeddings, self.centroids = texts, embeddings, np.asarray(centroids, np.float32)
        self.per_action = per_action
        actions = np.asarray(actions)
        order = np.argsort(actions, kind="stable")
        bounds = np.searchsorted(actions[order], np.arange(len(self.centroids) + 1))
        self._members = {a: order[bounds[a]:bounds[a + 1]] for a in range(len(self.centroids))}
        self._cache: dict[int, list[str]] = {}

    def __call__(self, action: int) -> list[str]:
        if action not in self._cache:
            members = self._members.get(action, np.zeros(0, np.int64))
            vectors = np.asarray(self.embeddings[np.sort(members)], dtype=np.float32)
            distance = ((vectors - self.centroids[action]) ** 2).sum(-1)
            nearest = np.sort(members)[np.argsort(distance)[: self.per_action]]
            self._cache[action] = [self.texts[i] for i in nearest]
        return self._cache[action]


def format_plan(generation: Generation, show_examples: int = 2) -> str:
    """Human-readable text and plan of one generation."""
    lines = [generation.text, "", "plan:"]
    for i, s in enumerate(generation.sentences):
        where = "prompt" if s.in_prompt else s.source
        action = f"action {s.action:>4}" if s.action >= 0 else "no action  "
        lines.append(f"  [{i}] {action}  p={s.probability:.3f}  ({where})  {s.text!r}")
        for example in s.examples[:show_examples]:
            lines.append(f"          e.g. {example!r}")
    stop = "end-of-text" if generation.stopped_at_eos else "max tokens"
    lines.append(f"({generation.new_tokens} new tokens, stopped at {stop})")
    return "\n".join(lines)
