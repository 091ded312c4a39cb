"""Bootstrap confidence intervals over documents.

Tokens of one document are not independent, so we resample whole documents (with replacement)
and recompute the token-weighted perplexity of each resample. Comparisons between runs use the
*same* resamples for both runs (a paired bootstrap), which is what makes a small relative
change distinguishable from noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A point estimate with a percentile bootstrap interval."""

    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def resample_indices(num_docs: int, num_samples: int = 1000, seed: int = 0) -> np.ndarray:
    """``[num_samples, num_docs]`` document indices drawn with replacement (seeded).

    Draw once and pass to every run you want to compare, so the intervals are paired.
    """
    if num_docs < 1:
        raise ValueError("cannot bootstrap over zero documents")
    return np.random.default_rng(seed).integers(0, num_docs, size=(num_samples, num_docs))


def _ppl_of_resamples(doc_nll: np.ndarray, doc_tokens: np.ndarray, idx: np.ndarray) -> np.ndarray:
    tokens = doc_tokens[idx].sum(axis=1)
    return np.exp(doc_nll[idx].sum(axis=1) / np.maximum(tokens, 1))


def _interval(value: float, samples: np.ndarray, confidence: float) -> Interval:
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(samples, [alpha, 1.0 - alpha])
    return Interval(value, float(low), float(high))


def ppl_interval(
    doc_nll: np.ndarray,
    doc_tokens: np.ndarray,
    indices: np.ndarray,
    confidence: float = 0.95,
) -> Interval:
    """Per-token perplexity ``exp(sum NLL / sum tokens)`` with its bootstrap interval."""
    doc_nll, doc_tokens = np.asarray(doc_nll, float), np.asarray(doc_tokens, np.int64)
    point = math.exp(doc_nll.sum() / max(int(doc_tokens.sum()), 1))
    return _interval(point, _ppl_of_resamples(doc_nll, doc_tokens, indices), confidence)


def relative_change_interval(
    doc_nll: np.ndarray,
    reference_nll: np.ndarray,
    doc_tokens: np.ndarray,
    indices: np.ndarray,
    confidence: float = 0.95,
) -> Interval:
    """Relative PPL change ``ppl / ppl_reference - 1`` of two runs scored on the same tokens.

    Negative = better than the reference. Paired: both runs use the same resampled documents.
    """
    doc_nll = np.asarray(doc_nll, float)
    reference_nll = np.asarray(reference_nll, float)
    doc_tokens = np.asarray(doc_tokens, np.int64)
    total = max(int(doc_tokens.sum()), 1)
    point = math.exp((doc_nll.sum() - reference_nll.sum()) / total) - 1.0
    ratio = _ppl_of_resamples(doc_nll, doc_tokens, indices) / _ppl_of_resamples(
        reference_nll, doc_tokens, indices
    )
    return _interval(point, ratio - 1.0, confidence)
