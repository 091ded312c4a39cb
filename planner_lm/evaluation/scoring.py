"""Scoring a conditioned LM on a text (the test split or another corpus): the documents, the action weights of each code
source, and a token scorer that conditions every token on its target sentence's code.

Plain torch: evaluation reads models and text code, never the Lightning modules.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from planner_lm.data.lm_windows import load_or_build_token_cache
from planner_lm.errors import UserError
from planner_lm.evaluation.perplexity import ScoringDocument, causal_lm_logprobs, sliding_window_nll
from planner_lm.models.conditioning import CONFIG_FILE
from planner_lm.models.selection import CODE_SOURCES, OTHER_DOC_SOURCE, eval_source, select_weights
from planner_lm.evaluation.texts import ScoredText
from planner_lm.run_folder import JointRun


@dataclass
class TestSet:
    """The scored test documents and their sentences (global ids ``first .. first + n - 1``)."""

    documents: list[ScoringDocument]
    texts: list[str]
    spans: list[list[tuple[int, int]]]
    doc_first: list[int]
    first: int
    sentence_ids: torch.Tensor
    sentence_doc_first: torch.Tensor
    actions: torch.Tensor

    @property
    def positions(self) -> torch.Tensor:
        """Each sentence's index in its document (the boundary and position controls' code)."""
        return self.sentence_ids - self.sentence_doc_first

    @property
    def num_tokens(self) -> int:
        return sum(d.num_targets for d in self.documents)


def load_test_set(text: ScoredText, tokenizer: Any, fingerprint: str, max_docs: int | None) -> TestSet:
    """Tokenize the documents once (the token cache format training uses) and pick the first `max_docs`."""
    split = text.documents
    tokens = load_or_build_token_cache(split, tokenizer, text.token_cache_dir, text.name, fingerprint)
    count = len(split) if max_docs is None else min(max_docs, len(split))
    if count == 0:
        raise UserError(f"{text.name} has no documents to score; for the test split re-run `make prepare` with "
                        "split.test_docs > 0")
    documents, texts, spans, firsts = [], [], [], []
    for doc, row in enumerate(split.select(range(count))):
        lo, hi = int(tokens.doc_offsets[doc]), int(tokens.doc_offsets[doc + 1])
        documents.append(ScoringDocument(torch.from_numpy(np.array(tokens.input_ids[lo:hi], dtype=np.int64)),
                                         torch.from_numpy(np.array(tokens.target_sentence[lo:hi], dtype=np.int64))))
        texts.append(row["text"])
        spans.append(list(zip(row["sent_start"], row["sent_end"])))
        firsts.append(int(row["first_sentence"]))
    ids, doc_first, true = scored_sentences(text, firsts[0], firsts[-1] + len(spans[-1]))
    return TestSet(documents, texts, spans, firsts, firsts[0], ids, doc_first, true)


def scored_sentences(text: ScoredText, first: int | None = None, end: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sentence ids ``first .. end - 1`` (default: every sentence of ``text``'s documents), the first
    sentence of each one's document, and each one's action: what planner accuracy is scored on."""
    if first is None or end is None:
        rows = text.documents
        first = int(rows[0]["first_sentence"])
        end = int(rows[len(rows) - 1]["first_sentence"]) + len(rows[len(rows) - 1]["sent_start"])
    ids = np.arange(first, end, dtype=np.int64)
    true = np.array(text.actions[first:end], dtype=np.int64)
    return (torch.from_numpy(ids), torch.from_numpy(np.asarray(text.doc_first[ids], dtype=np.int64)),
            torch.from_numpy(true))


def code_weights(source: str, logits: torch.Tensor | None, actions: torch.Tensor, num_actions: int,
                 positions: torch.Tensor, temperature: float = 1.0) -> torch.Tensor | None:
    """Per-sentence action weights ``[M, K]`` of one code source (None for ``none``).

    ``positions`` is each sentence's index in its document (boundary, position); ``temperature`` is the
    softmax temperature the run was trained with (planner_soft).
    """
    if source in ("planner_soft", OTHER_DOC_SOURCE):  # the other-document control: logits of other contexts
        return select_weights(logits, "soft", temperature=temperature)
    if source == "planner_hard":
        return select_weights(logits, "hard")
    if source == "oracle":
        return select_weights(None, "oracle", oracle_actions=actions, num_actions=num_actions)
    if source in ("boundary", "position"):
        return select_weights(None, source, sentence_index=positions, num_actions=num_actions)
    if source in ("fixed", "uniform"):
        return select_weights(None, source, num_actions=num_actions, batch_shape=(len(actions),))
    if source == "none":
        return None
    raise UserError(f"unknown code source {source!r}; choose from {', '.join(CODE_SOURCES)}")


def token_weights(table: torch.Tensor, cond: torch.Tensor, first: int) -> torch.Tensor:
    """Each token's row of a per-sentence weights table (zeros for tokens without a sentence)."""
    rows = (cond - first).clamp(min=0, max=len(table) - 1)
    return table[rows] * (cond >= 0).unsqueeze(-1).to(table.dtype)


def make_scorer(lm: torch.nn.Module, table: torch.Tensor | None, first: int, device: torch.device, precision: str):
    """A ``TokenScorer`` that conditions each token on its target sentence's row of ``table``."""
    table = None if table is None else table.to(device)
    autocast = precision == "bf16"

    def score(ids: torch.Tensor, mask: torch.Tensor, cond: torch.Tensor, keep: int) -> torch.Tensor:
        weights = None if table is None else token_weights(table, cond, first)
        # the base itself runs inside the conditioning, so its output layer runs only where a token is scored
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast), lm.conditioned(weights):
            return causal_lm_logprobs(lm.base, ids, mask, keep)

    return score


def shared_plain_lm(run: JointRun) -> str | None:
    """Runs whose plain LM (no actions) is the same frozen base share one `none` score: its key."""
    config_path = run.lm_dir / CONFIG_FILE
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text())
    if config.get("base_mode") == "frozen" and not config.get("base_saved") and config.get("base_fingerprint"):
        return config["base_fingerprint"]
    return None


def bf16_vs_fp32(lm, table, test: TestSet, device: torch.device, docs: int, **windows: int) -> dict[str, float]:
    """The measured bf16 gap: one run's PPL with bf16 autocast and in fp32 on the first `docs` test
    documents, and `rel_diff` = bf16 / fp32 - 1; `windows` are `sliding_window_nll`'s window, stride
    and batch_size. Reported beside bf16 figures so a reader can weigh them against their Δs."""
    documents = test.documents[:docs]
    ppl = {precision: sliding_window_nll(documents, make_scorer(lm, table, test.first, device, precision),
                                         device=device, **windows).ppl for precision in ("32", "bf16")}
    return {"docs": len(documents), "tokens": sum(d.num_targets for d in documents), "ppl_fp32": ppl["32"],
            "ppl_bf16": ppl["bf16"], "rel_diff": ppl["bf16"] / ppl["32"] - 1}


def scored_sources(selection: str, requested: list[str] | None) -> list[str]:
    """The code sources a run is scored with: its matched source first, then the requested ones
    (`matched` stands for the matched source; None: every code source; no repeats). The
    other-document control only where the matched source is planner_soft: it swaps those codes."""
    matched = eval_source(selection)
    wanted = CODE_SOURCES if requested is None else requested
    sources = dict.fromkeys([matched, *(matched if s == "matched" else s for s in wanted)])
    return [s for s in sources if s != OTHER_DOC_SOURCE or matched == "planner_soft"]
