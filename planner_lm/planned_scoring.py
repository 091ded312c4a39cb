"""Scoring and writing arbitrary text with a finished joint run, the planner in the loop.

This is what an outside evaluator (lm-evaluation-harness, `planner_lm.harness`) sees: text in,
log-likelihoods or continuations out. Sentences are found by the run's splitter; the action of
sentence ``j`` comes from the planner reading the encoded sentences ``< j`` of the same text (never
sentence ``j`` itself, whose content is what is being scored), mixed as the run was trained
(soft, hard, or a planner-free control); each token is conditioned on the action of the sentence
the next token belongs to, exactly as in training and in the evaluate stage. Plain torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from planner_lm.errors import UserError
from planner_lm.evaluation.perplexity import ScoringDocument, sliding_window_nll
from planner_lm.evaluation.scoring import code_weights, make_scorer
from planner_lm.generation import SamplingConfig
from planner_lm.pipeline.generate import load_generator
from planner_lm.run_folder import JOINT_PREFIX
from planner_lm.sentences import sentence_spans
from planner_lm.tokenization import tokenize_documents

PLANNER_SOURCES = {"soft": "planner_soft", "hard": "planner_hard"}
"""Code source of each generation-time conditioning (the controls keep their own name)."""


@dataclass
class PlannedText:
    """One text as the conditioned LM reads it: token ids (BOS first), each token's conditioning
    sentence, and per-sentence action weights (None for the plain LM)."""

    input_ids: torch.Tensor
    target_sentence: torch.Tensor
    weights: torch.Tensor | None


class PlannedLM:
    """A finished `4_joint-<selection>` run as a text scorer and writer.

    Args:
        run: the joint-run directory, e.g. `runs/demo/4_joint-soft`.
        device: `auto`, `cpu` or `cuda[:i]`.
        max_length: tokens the LM attends to (default: its position count).
    """

    def __init__(self, run: str | Path, device: str = "auto", max_length: int | None = None) -> None:
        run = Path(run)
        self.generator, self.conditioning, self.temperature = load_generator(
            run.parent, self._selection_of(run), device, examples=0)
        self.lm, self.tokenizer = self.generator.lm, self.generator.tokenizer
        self.device = self.generator.device
        self.max_length = int(max_length or self.generator.context_window())

    @staticmethod
    def _selection_of(run: Path) -> str:
        return run.name[len(JOINT_PREFIX):] if run.name.startswith(JOINT_PREFIX) else run.name

    # ------------------------------------------------------------------ planning
    def plan(self, text: str) -> PlannedText:
        """Tokens, conditioning sentences and action weights of `text` (see module doc)."""
        spans = sentence_spans(text) or [(0, len(text))]
        doc = tokenize_documents(self.tokenizer, [text], [[a for a, _ in spans]], [[b for _, b in spans]])[0]
        weights = None
        if self.conditioning != "none":
            sentences = [text[a:b] for a, b in spans]
            vectors = list(self.generator.encode(sentences).float()) if sentences else []
            logits = self.generator.planner_logits([vectors[:j] for j in range(len(spans))])
            source = PLANNER_SOURCES.get(self.conditioning, self.conditioning)
            if logits is None and source.startswith("planner"):
                raise UserError("this run has no planner (and the run folder no pretrained one) to plan with; "
                                "run `make pretrain-planner` or score a planner-free control run")
            weights = code_weights(source, logits, torch.zeros(len(spans), dtype=torch.long),
                                   self.generator.num_actions, torch.arange(len(spans)), self.temperature).float()
        return PlannedText(torch.as_tensor(doc.input_ids, dtype=torch.long),
                           torch.as_tensor(doc.target_sentence, dtype=torch.long), weights)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
        """log p(continuation | context) and whether greedy decoding would write it (left-truncated
        to `max_length` tokens, as Hugging Face models are scored in the harness)."""
        planned = self.plan(context + continuation)
        ids, sentences = planned.input_ids, planned.target_sentence
        start = max(0, len(ids) - 1 - self.max_length)  # inputs ids[start:-1] predict ids[start + 1:]
        inputs, targets = ids[start:-1], ids[start + 1:]
        weights = None
        if planned.weights is not None:
            weights = planned.weights[sentences[start:-1].clamp(min=0)][None].to(self.device)
        logits = self.lm(input_ids=inputs[None].to(self.device), action_weights=weights).logits[0].float()
        context_tokens = len(self.tokenizer(context, add_special_tokens=False)["input_ids"])
        count = min(max(len(ids) - 1 - context_tokens, 1), len(targets))  # continuation tokens (BOS excluded)
        scores = torch.log_softmax(logits[-count:], dim=-1)
        wanted = targets[-count:].to(self.device)
        return float(scores.gather(-1, wanted[:, None]).sum()), bool((scores.argmax(-1) == wanted).all())

    @torch.no_grad()
    def rolling_loglikelihood(self, text: str) -> float:
        """log p(text), every token scored once with up to `max_length` tokens of context."""
        planned = self.plan(text)
        scorer = make_scorer(self.lm, planned.weights, 0, self.device, "32")
        result = sliding_window_nll([ScoringDocument(planned.input_ids, planned.target_sentence)], scorer,
                                    window=self.max_length, stride=self.max_length - 1, batch_size=8,
                                    device=self.device)
        return -float(result.doc_nll[0])

    # ------------------------------------------------------------------ writing
    def generate(self, context: str, until: list[str], max_new_tokens: int = 128, temperature: float = 0.0) -> str:
        """The continuation of `context` (re-planned at every sentence end), cut at the first `until` string."""
        config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0,
                                selection=self.conditioning, planner_temperature=self.temperature, seed=0)
        text = self.generator.generate([context], None, config)[0].continuation
        cuts = [text.find(stop) for stop in until if stop and stop in text]
        return text[: min(cuts)] if cuts else text
