"""Sliding-window perplexity inside documents, the papers' protocol, batched.

Every target token (all tokens of a document but its first, the BOS) is scored exactly once.
The first window of a document covers its first ``window`` tokens and scores all of them; each
next window ends ``stride`` tokens further and scores only the targets the previous window did
not reach, with as much left context as ``window`` allows. ``stride=1`` is the papers' exact
protocol (every target after the first window sees ``window - 1`` tokens of context);
``stride=window - 1`` gives non-overlapping windows like training (the fast default). Causal
attention makes scoring the whole first window at once identical to stride 1 there, so the two
agree exactly on documents no longer than ``window``.

The module is model-agnostic: it calls a ``TokenScorer`` that maps a padded batch of windows to
next-token log-probabilities, so the same code measures the plain LM and every code source of
a conditioned LM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

TokenScorer = Callable[[Tensor, Tensor, Tensor, int], Tensor]
"""``(input_ids[B,L], attention_mask[B,L], condition_ids[B,L], keep) -> logprobs[B,keep]``.

The log-probabilities of the last ``keep`` tokens of each (right-padded) row:
``logprobs[b, j]`` is log p(input_ids[b, L-keep+j] | input_ids[b, :L-keep+j]). At stride 1 a
window scores one token, so ``keep`` is 1 for most batches and a causal LM needs its output layer
(the 50,257-way product that dominates a small LM's cost) at ``keep + 1`` positions only, not all
``L`` (`causal_lm_logprobs`). Entries of padding tokens are never read. ``condition_ids`` are
the per-token ids carried by :class:`ScoringDocument` (usually the global id of the sentence whose
action conditions the token), padded with -1.
"""


@dataclass(frozen=True)
class ScoringDocument:
    """One tokenized document.

    ``input_ids[0]`` is the BOS token and is never scored. ``condition_ids[t]`` is handed to the
    scorer with token ``t``: in this project the global id of the sentence that token ``t + 1``
    belongs to (the papers' shift), so ``condition_ids[t - 1]`` is the sentence of target ``t``.
    """

    input_ids: Tensor
    condition_ids: Tensor

    def __post_init__(self) -> None:
        if self.input_ids.ndim != 1 or self.input_ids.shape != self.condition_ids.shape:
            raise ValueError("input_ids and condition_ids must be 1-D tensors of equal length")

    @property
    def num_targets(self) -> int:
        return max(len(self.input_ids) - 1, 0)


@dataclass(frozen=True)
class Window:
    """Tokens ``[start, end)`` of document ``doc``; targets ``first_target .. end - 1`` are scored."""

    doc: int
    start: int
    end: int
    first_target: int


@dataclass
class PerplexityResult:
    """Per-document NLL sums and counts (for bootstrap CIs) plus per-token detail (for plots)."""

    doc_nll: np.ndarray  # float64 [num_docs]: summed NLL of the document's targets (nats)
    doc_tokens: np.ndarray  # int64 [num_docs]: number of targets per document
    token_nll: list[np.ndarray] = field(default_factory=list)  # per doc, float32 [num_targets]

    @property
    def num_tokens(self) -> int:
        return int(self.doc_tokens.sum())

    @property
    def mean_nll(self) -> float:
        return float(self.doc_nll.sum() / max(self.num_tokens, 1))

    @property
    def ppl(self) -> float:
        """Per-token perplexity: exp of the mean NLL over all scored tokens of all documents."""
        return math.exp(self.mean_nll)


def plan_windows(doc_lengths: Sequence[int], window: int, stride: int) -> list[Window]:
    """The windows that score every target of every document exactly once."""
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    if not 1 <= stride <= window - 1:
        raise ValueError(f"stride must be between 1 and window - 1 = {window - 1}, got {stride}")
    windows: list[Window] = []
    for doc, length in enumerate(doc_lengths):
        if length < 2:
            continue
        end = min(window, length)
        windows.append(Window(doc, 0, end, 1))
        while end < length:
            new_end = min(end + stride, length)
            windows.append(Window(doc, max(0, new_end - window), new_end, end))
            end = new_end
    return windows


def _batches(windows: list[Window], batch_size: int) -> Iterator[list[Window]]:
    # Long windows first: batches hold windows of similar length, so little padding; among equal
    # lengths, windows that score many tokens (a document's first) go together, so the rest of
    # the batches at stride 1 need the output layer at one position only.
    ordered = sorted(windows, key=lambda w: (w.end - w.start, w.end - w.first_target), reverse=True)
    for i in range(0, len(ordered), batch_size):
        yield ordered[i : i + batch_size]


@torch.no_grad()
def sliding_window_nll(
    documents: Sequence[ScoringDocument],
    scorer: TokenScorer,
    *,
    window: int = 128,
    stride: int = 127,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    pad_id: int = 0,
    progress: bool | str = False,
) -> PerplexityResult:
    """Score every target token of ``documents`` once; see the module docstring for the protocol.

    ``progress`` shows a tqdm bar (a string is used as its description).
    """
    lengths = [len(d.input_ids) for d in documents]
    windows = plan_windows(lengths, window, stride)
    token_nll = [np.zeros(max(n - 1, 0), dtype=np.float32) for n in lengths]
    batches = list(_batches(windows, batch_size))
    bar = tqdm(
        batches,
        desc=progress if isinstance(progress, str) else "perplexity",
        disable=not progress,
        unit="batch",
    )
    for batch in bar:
        width = max(w.end - w.start for w in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        cond = torch.full((len(batch), width), -1, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, w in enumerate(batch):
            doc = documents[w.doc]
            n = w.end - w.start
            ids[row, :n] = doc.input_ids[w.start : w.end]
            cond[row, :n] = doc.condition_ids[w.start : w.end]
            mask[row, :n] = 1
        # the trailing targets that any row of the batch scores (local positions width-keep .. width-1)
        keep = width - min(w.first_target - w.start for w in batch)
        logprobs = scorer(ids.to(device), mask.to(device), cond.to(device), keep).float().cpu()
        if logprobs.shape != (len(batch), keep):
            raise ValueError(f"scorer returned shape {tuple(logprobs.shape)}, expected {(len(batch), keep)}")
        for row, w in enumerate(batch):
            # target t sits at local position t - start, column t - start - (width - keep)
            lo, hi = w.first_target - w.start - (width - keep), w.end - w.start - (width - keep)
            token_nll[w.doc][w.first_target - 1 : w.end - 1] = -logprobs[row, lo:hi].numpy()
    doc_nll = np.array([float(x.astype(np.float64).sum()) for x in token_nll], dtype=np.float64)
    doc_tokens = np.array([len(x) for x in token_nll], dtype=np.int64)
    return PerplexityResult(doc_nll=doc_nll, doc_tokens=doc_tokens, token_nll=token_nll)


def next_token_logprobs(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Logits of a causal LM at the last ``n`` positions (``[B,n,V]``, ``n <= L``; all ``L`` for
    a plain forward) → the log-probabilities of the last ``n - 1`` tokens of ``input_ids[B,L]``.

    Uses cross-entropy (one fused log-softmax) rather than materialising a second vocabulary-size
    tensor of log-probabilities.
    """
    shifted = logits[:, :-1].float()
    targets = input_ids[:, input_ids.shape[1] - shifted.shape[1]:]
    nll = torch.nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), reduction="none"
    )
    return -nll.view(targets.shape)


LINEAR_HEAD_FAMILIES = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "gemma", "phi3",
                                  "gpt_neox", "opt"})
"""Families whose logits are exactly ``get_output_embeddings()(base_model(...).last_hidden_state)``
(no final scaling or soft-capping; `tests/test_perplexity.py` checks each against ``.logits``), so
scoring can run the output layer itself, only where a token is scored."""

HEAD_CHUNK_ELEMENTS = {"cpu": 1 << 23, "other": 1 << 27}
"""Logits materialised at a time (rows × vocabulary; 32 MiB in fp32 on CPUs, 512 MiB on GPUs, where
small products waste the device), whatever the batch: the output layer and its log-softmax run
over chunks of scored positions, never a ``[B, L, V]`` tensor."""


def _backbone_and_head(model: Any) -> tuple[Any, Any] | None:
    """(backbone, output layer) of a Hugging Face causal LM whose family `LINEAR_HEAD_FAMILIES` lists."""
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in LINEAR_HEAD_FAMILIES or not hasattr(model, "get_output_embeddings"):
        return None
    backbone, head = getattr(model, "base_model", model), model.get_output_embeddings()
    return None if backbone is model or head is None else (backbone, head)


def head_logprobs(head: Callable[[Tensor], Tensor], hidden: Tensor, targets: Tensor, vocab_size: int) -> Tensor:
    """log p(targets[i] | hidden[i]) for rows of final hidden states ``[N, D]``, the output layer and
    its log-softmax (fp32, as `next_token_logprobs`) run over `HEAD_CHUNK_ELEMENTS`-sized chunks."""
    out = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
    chunk = HEAD_CHUNK_ELEMENTS["cpu" if hidden.device.type == "cpu" else "other"]
    rows = max(1, chunk // max(vocab_size, 1))
    for start in range(0, len(targets), rows):
        logits = head(hidden[start : start + rows]).float()
        out[start : start + rows] = -torch.nn.functional.cross_entropy(
            logits, targets[start : start + rows], reduction="none")
    return out


def causal_lm_logprobs(model: Callable[..., Any], ids: Tensor, mask: Tensor, keep: int, **inputs: Any) -> Tensor:
    """The ``TokenScorer`` result for a Hugging Face causal LM (extra ``inputs`` go to its forward).

    For the families of `LINEAR_HEAD_FAMILIES` the backbone runs once and the output layer only at
    the positions that predict a scored, non-padding token, in chunks (`head_logprobs`); padded
    targets get 0. Other models run with ``logits_to_keep=keep + 1``.
    """
    parts = _backbone_and_head(model)
    if parts is None:
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep + 1, **inputs).logits
        return next_token_logprobs(logits, ids)
    backbone, head = parts
    hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False, **inputs).last_hidden_state
    length = ids.shape[1]
    targets, scored = ids[:, length - keep:], mask[:, length - keep:].bool()
    logprobs = torch.zeros(targets.shape, dtype=torch.float32, device=ids.device)
    logprobs[scored] = head_logprobs(head, hidden[:, length - keep - 1 : length - 1][scored], targets[scored],
                                     int(model.config.vocab_size))
    return logprobs


def position_in_sentence(condition_ids: Tensor) -> np.ndarray:
    """For each target ``t >= 1``: its index within its sentence (0 = the sentence's first token).

    The sentence of target ``t`` is ``condition_ids[t - 1]`` (the papers' shift), so runs of equal
    values in ``condition_ids[:-1]`` are sentences.
    """
    sentence = condition_ids[:-1].cpu().numpy()
    positions = np.zeros(len(sentence), dtype=np.int64)
    for i in range(1, len(sentence)):
        positions[i] = positions[i - 1] + 1 if sentence[i] == sentence[i - 1] else 0
    return positions


def nll_by_position(
    results: PerplexityResult, documents: Sequence[ScoringDocument], max_position: int = 48
) -> tuple[np.ndarray, np.ndarray]:
    """Mean NLL by token position within a sentence (positions ≥ ``max_position`` pooled).

    Returns ``(mean_nll[max_position + 1], count[max_position + 1])``; empty bins are NaN.
    """
    sums = np.zeros(max_position + 1)
    counts = np.zeros(max_position + 1, dtype=np.int64)
    for doc, nll in zip(documents, results.token_nll):
        if len(nll) == 0:
            continue
        pos = np.minimum(position_in_sentence(doc.condition_ids), max_position)
        np.add.at(sums, pos, nll)
        np.add.at(counts, pos, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return mean, counts
