"""Does generated text follow a plan? ROUGE-2, action edit distance, plan-following rate.

- ROUGE-2 F (rouge-score, stemmed) between a generated continuation and the true one;
- Levenshtein distance between the action sequence of the generated text and of the true
  continuation (unnormalised, as in the authors' evaluation; we also report it divided by the
  longer length so documents of different lengths can be averaged);
- plan-following rate: the fraction of generated sentences whose own k-means action equals the
  action the LM was conditioned on while writing them.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence


@lru_cache(maxsize=1)
def _rouge2_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge2"], use_stemmer=True)


def rouge2_f(generated: str, reference: str) -> float:
    """ROUGE-2 F-measure of ``generated`` against ``reference`` (0 when either has no bigram)."""
    return float(_rouge2_scorer().score(reference, generated)["rouge2"].fmeasure)


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance (insert, delete, substitute: cost 1 each) between two sequences."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def normalized_edit_distance(a: Sequence[int], b: Sequence[int]) -> float:
    """Edit distance divided by the longer length (0 = identical, 1 = nothing in common)."""
    longest = max(len(a), len(b))
    return edit_distance(a, b) / longest if longest else 0.0


def plan_following_rate(conditioned: Sequence[int], realized: Sequence[int]) -> float:
    """Fraction of sentences whose realized action equals the one they were conditioned on.

    NaN when there is no sentence to judge.
    """
    if len(conditioned) != len(realized):
        raise ValueError(
            f"{len(conditioned)} conditioned actions but {len(realized)} realized sentences"
        )
    if not conditioned:
        return float("nan")
    return sum(int(c == r) for c, r in zip(conditioned, realized)) / len(conditioned)
