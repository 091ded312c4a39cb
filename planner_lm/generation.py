"""Sampling from an action-conditioned LM with the planner in the loop.

Generation follows the training alignment (see ``planner_lm.tokenization``): the token that ends
sentence ``i`` predicts the first token of sentence ``i + 1``, so it is fed with the action of
sentence ``i + 1``. After each sampled token we therefore ask the one sentence splitter
(``planner_lm.sentences``) whether the open sentence is now complete: we split the open sentence
followed by a probe word (" The"), so Punkt sees a likely next sentence start and can still
reject abbreviations ("Dr."), decimals and initials as it does on real text. When it is complete,
the sentence is embedded with the sentence encoder, the planner reads the previous ≤ S sentence
vectors of this text and picks the next action, and the sentence-final token is fed with it.

A plan can be forced: ``plan[i]`` is the action of the ``i``-th sentence counted from the one the
prompt leaves open (``None`` lets the planner choose that one), so a user can steer or edit.

Decoding is batched over prompts with a KV cache, temperature and nucleus (top-p) sampling. When
the cache reaches the LM's context window it is rebuilt from the last half window (the authors
used a rolling window too); every token keeps the action weights it was first fed with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from planner_lm.data.contexts import gather_contexts
from planner_lm.generation_plan import Generation, PlannedSentence
from planner_lm.models.selection import GENERATION_SELECTIONS, select_weights
from planner_lm.sentence_vectors import SentenceEncoder
from planner_lm.sentences import is_sentence_complete, sentence_spans
from planner_lm.tokenization import bos_token_id, tokenize_documents


@dataclass
class SamplingConfig:
    """How tokens and actions are chosen.

    Args:
        max_new_tokens: number of tokens to generate per prompt (fewer if EOS is sampled).
        temperature: softmax temperature of token sampling; 0 = greedy.
        top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches top_p.
        selection: what the LM is conditioned on: ``soft`` (the paper's joint model: the
            planner's softmax-weighted codebook), ``hard`` (the planner's argmax action), or the
            planner-free controls ``fixed`` (action 0), ``uniform`` (the mean codebook vector) and
            ``none`` (no conditioning). With a planner loaded, the plan still shows its choices.
        planner_temperature: softmax temperature applied to planner logits.
        stop_at_eos: end a row when it samples the end-of-text token.
        context_window: LM context length; None = the model's maximum position count.
        seed: seed of the sampling generator (None = unseeded).
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    selection: str = "soft"
    planner_temperature: float = 1.0
    stop_at_eos: bool = True
    context_window: int | None = None
    seed: int | None = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.selection not in GENERATION_SELECTIONS:
            raise ValueError(
                f"selection must be one of {', '.join(GENERATION_SELECTIONS)}, got {self.selection!r}"
            )
        if self.planner_temperature <= 0:
            raise ValueError(f"planner_temperature must be > 0, got {self.planner_temperature}")


@dataclass
class _Row:
    """Decoding state of one prompt."""

    prompt: str
    plan: list[int | None]
    tokens: list[int]  # BOS, prompt tokens, sampled tokens
    token_sentence: list[int]  # per token: index of the sentence whose action it is fed with
    sentences: list[PlannedSentence]  # completed sentences, then the open one
    weights: list[Tensor]  # action weights per sentence
    vectors: list[Tensor]  # embeddings of the completed sentences
    open_start: int  # index in ``tokens`` of the open sentence's first token
    prompt_sentences: int  # sentences completed inside the prompt
    prompt_tokens: int
    done: bool = False
    stopped_at_eos: bool = False


def _cache_argument_name(lm: torch.nn.Module) -> str:
    """``cache`` (transformers >= 5.2x) or ``past_key_values`` (older): what the HF model takes."""
    import inspect

    from transformers import PreTrainedModel

    hf_model = next((m for m in lm.modules() if isinstance(m, PreTrainedModel)), None)
    if hf_model is not None and "cache" in inspect.signature(hf_model.forward).parameters:
        return "cache"
    return "past_key_values"


def sample_next_token(
    logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> Tensor:
    """Sample one token per row from ``logits [B, V]`` (greedy at temperature 0)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens ranked before it already reach top_p
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class PlannerGenerator:
    """Planner-in-the-loop sampler (plain torch; no Lightning).

    Args:
        lm: an ``ActionConditionedLM`` (or a module with its forward signature: ``input_ids``,
            ``attention_mask``, ``position_ids``, ``action_weights [B,T,K] | None``,
            ``past_key_values``, ``use_cache``), in eval mode.
        tokenizer: the LM's fast tokenizer.
        encode: sentence encoder that embeds completed sentences for the planner.
        num_actions: K, the number of writing actions.
        planner: the planner, or None (then every sentence's action must be forced).
        action_examples: optional ``action -> example sentences`` shown in the plan.
    """

    def __init__(
        self,
        lm: torch.nn.Module,
        tokenizer: Any,
        encode: SentenceEncoder,
        num_actions: int,
        planner: torch.nn.Module | None = None,
        action_examples: Callable[[int], list[str]] | None = None,
    ) -> None:
        self.lm, self.tokenizer, self.encode = lm, tokenizer, encode
        self.num_actions, self.planner, self.action_examples = num_actions, planner, action_examples
        self.bos = bos_token_id(tokenizer)
        self.eos = tokenizer.eos_token_id
        self.device = next(lm.parameters()).device
        self._cache_kwarg = _cache_argument_name(lm)
        self._unconditioned = False

    # ------------------------------------------------------------------ planning
    def planner_logits(self, histories: Sequence[Sequence[Tensor]]) -> Tensor | None:
        """Planner logits ``[n, K]`` for contexts given as lists of previous sentence vectors.

        Each history is laid out as a document of its own (global ids ``first .. first + len - 1``)
        and the contexts come from `gather_contexts`, as in training and evaluation.
        """
        if self.planner is None:
            return None
        dim = int(self.planner.embedding_dim)
        lengths = torch.tensor([len(h) for h in histories])
        firsts = torch.cumsum(lengths, 0) - lengths
        vectors = [v for h in histories for v in h]
        # one zero row after the last sentence: the target id of the longest history stays in range
        table = torch.cat([torch.stack(vectors).float() if vectors else torch.zeros(0, dim), torch.zeros(1, dim)])
        context, mask = gather_contexts(table, firsts + lengths, firsts, int(self.planner.context_sentences))
        device = next(self.planner.parameters()).device
        with torch.no_grad():
            return self.planner(context.to(device), mask.to(device)).float().cpu()

    def _decide(
        self, logits: Tensor | None, forced: int | None, config: SamplingConfig, what: str, sentence_index: int
    ) -> tuple[PlannedSentence, Tensor]:
        """The open sentence's plan entry and action weights (all zero for ``none``)."""
        probs = None if logits is None else torch.softmax(logits / config.planner_temperature, -1)

        def probability(action: int) -> float:
            return float(probs[action]) if probs is not None and action >= 0 else float("nan")

        if forced is not None:
            weights = torch.nn.functional.one_hot(torch.tensor(forced), self.num_actions).float()
            return PlannedSentence("", forced, probability(forced), "forced"), weights
        if config.selection in ("fixed", "boundary", "position", "uniform", "none"):
            weights = select_weights(None, config.selection, num_actions=self.num_actions, batch_shape=(),
                                     sentence_index=torch.tensor(sentence_index))
            weights = torch.zeros(self.num_actions) if weights is None else weights.float()
            # fixed, boundary and position give one action; otherwise show what the planner would have chosen
            if config.selection in ("fixed", "boundary", "position"):
                action = int(weights.argmax())
            else:
                action = int(logits.argmax()) if logits is not None else -1
            return PlannedSentence("", action, probability(action), config.selection), weights
        if logits is None:
            raise ValueError(f"no planner loaded to choose the action of {what}; force it with a plan")
        weights = select_weights(logits, config.selection, temperature=config.planner_temperature)
        action = int(logits.argmax())
        return PlannedSentence("", action, probability(action), "planner"), weights.float()

    def _forced(self, row: _Row, sentence_index: int) -> int | None:
        step = sentence_index - row.prompt_sentences
        return row.plan[step] if 0 <= step < len(row.plan) else None

    # ------------------------------------------------------------------ prompt
    def _start_row(self, prompt: str, plan: Sequence[int | None], config: SamplingConfig) -> _Row:
        for action in plan:
            if action is not None and not 0 <= int(action) < self.num_actions:
                raise ValueError(f"plan action {action} is outside 0..{self.num_actions - 1}")
        spans = sentence_spans(prompt)
        complete = bool(spans) and is_sentence_complete(prompt[spans[-1][0]:])
        closed = spans if complete else spans[:-1]
        row = _Row(prompt, list(plan), [self.bos], [], [], [], [], 1, len(closed), 0)
        texts = [prompt[a:b] for a, b in closed]
        if texts:
            row.vectors = list(self.encode(texts).float().cpu())
        # every sentence of the prompt, and the open one, planned from the sentences before it
        logits = self.planner_logits([row.vectors[:j] for j in range(len(closed) + 1)])
        for j in range(len(closed) + 1):
            entry, weights = self._decide(
                None if logits is None else logits[j], self._forced(row, j), config,
                f"prompt sentence {j + 1}" if j < len(closed) else "the first sentence", j,
            )
            entry.text = texts[j] if j < len(closed) else ""
            entry.in_prompt = j < len(closed)
            row.sentences.append(entry)
            row.weights.append(weights)
        if spans:
            doc = tokenize_documents(self.tokenizer, [prompt], [[a for a, _ in spans]], [[b for _, b in spans]])[0]
            row.tokens = [int(t) for t in doc.input_ids]
            row.token_sentence = [int(t) for t in doc.target_sentence]
            if complete:  # the last prompt token predicts the first token of the next sentence
                row.token_sentence[-1] = len(spans)
            open_index = len(row.sentences) - 1
            row.open_start = next(
                (t for t, s in enumerate(doc.sentence) if s == open_index), len(row.tokens)
            )
        else:
            row.token_sentence = [0]
        row.prompt_tokens = len(row.tokens)
        return row

    # ------------------------------------------------------------------ LM calls
    def _forward(self, ids: Tensor, mask: Tensor, positions: Tensor, weights: Tensor | None, past: Any):
        out = self.lm(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            action_weights=None if weights is None else weights.to(self.device),
            use_cache=True,
            **{self._cache_kwarg: past},
        )
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        return out.logits[:, -1].float().cpu(), cache

    def _prefill(self, rows: Sequence[_Row], keep: int | None):
        """Feed each row's last ``keep`` tokens (left-padded) and return logits, cache, mask."""
        histories = [(r.tokens[-keep:], r.token_sentence[-keep:]) if keep else (r.tokens, r.token_sentence) for r in rows]
        width = max(len(t) for t, _ in histories)
        ids = torch.full((len(rows), width), self.bos, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        weights = torch.zeros((len(rows), width, self.num_actions))
        for i, (row, (tokens, sentences)) in enumerate(zip(rows, histories)):
            ids[i, width - len(tokens):] = torch.tensor(tokens)
            mask[i, width - len(tokens):] = 1
            weights[i, width - len(tokens):] = torch.stack([row.weights[s] for s in sentences])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, past = self._forward(ids, mask, positions, None if self._unconditioned else weights, None)
        return logits, past, mask

    def context_window(self, config: SamplingConfig | None = None) -> int:
        """Tokens the LM can attend to: the sampling setting, else the model's position count."""
        if config is not None and config.context_window:
            return config.context_window
        lm_config = getattr(self.lm, "config", None) or getattr(getattr(self.lm, "base", None), "config", None)
        for name in ("n_positions", "max_position_embeddings"):
            value = getattr(lm_config, name, None)
            if value:
                return int(value)
        return 1024

    # ------------------------------------------------------------------ main loop
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        plans: Sequence[Sequence[int | None]] | None = None,
        config: SamplingConfig | None = None,
    ) -> list[Generation]:
        """Continue every prompt; ``plans[i]`` optionally forces the actions of prompt ``i``."""
        config = config or SamplingConfig()
        plans = plans if plans is not None else [[] for _ in prompts]
        if len(plans) != len(prompts):
            raise ValueError(f"{len(plans)} plans for {len(prompts)} prompts")
        if config.selection == "none" and any(plans):
            raise ValueError("a plan cannot steer an unconditioned LM (selection 'none')")
        self._unconditioned = config.selection == "none"
        window = self.context_window(config)
        generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
        rows = [self._start_row(p, plan, config) for p, plan in zip(prompts, plans)]
        if not rows:
            return []
        if max(len(r.tokens) for r in rows) > window:
            logits, past, mask = self._prefill(rows, window // 2)
        elif config.max_new_tokens:
            logits, past, mask = self._prefill(rows, None)
        for step in range(config.max_new_tokens):
            sampled = sample_next_token(logits, config.temperature, config.top_p, generator)
            self._append(rows, sampled.tolist(), config)
            if all(r.done for r in rows) or step == config.max_new_tokens - 1:
                break
            if mask.shape[1] + 1 > window:
                logits, past, mask = self._prefill(rows, window // 2)
                continue
            ids = torch.tensor([[r.tokens[-1]] for r in rows])
            weights = torch.stack([r.weights[r.token_sentence[-1]] for r in rows])[:, None]
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype)], dim=1)
            positions = mask.sum(-1, keepdim=True) - 1
            logits, past = self._forward(ids, mask, positions, None if self._unconditioned else weights, past)
        return [self._finish(r) for r in rows]

    def _append(self, rows: Sequence[_Row], sampled: Sequence[int], config: SamplingConfig) -> None:
        """Append sampled tokens; where a sentence just ended, plan the next one (batched)."""
        closing: list[tuple[_Row, str]] = []
        for row, token in zip(rows, sampled):
            if row.done:  # keeps the batch rectangular; never part of the output
                row.tokens.append(self.eos if self.eos is not None else self.bos)
                row.token_sentence.append(row.token_sentence[-1])
                continue
            row.tokens.append(int(token))
            row.token_sentence.append(len(row.sentences) - 1)
            if config.stop_at_eos and token == self.eos:
                row.done = row.stopped_at_eos = True
                continue
            text = self.tokenizer.decode(row.tokens[row.open_start:])
            if is_sentence_complete(text):
                closing.append((row, text.strip()))
        if not closing:
            return
        vectors = self.encode([text for _, text in closing]).float().cpu()
        for (row, text), vector in zip(closing, vectors):
            row.sentences[-1].text = text
            row.vectors.append(vector)
        logits = self.planner_logits([row.vectors for row, _ in closing])
        for i, (row, _) in enumerate(closing):
            index = len(row.sentences)
            entry, weights = self._decide(
                None if logits is None else logits[i], self._forced(row, index), config,
                f"sentence {index - row.prompt_sentences + 1}", index,
            )
            row.sentences.append(entry)
            row.weights.append(weights)
            row.token_sentence[-1] = index  # the sentence-final token predicts the new sentence
            row.open_start = len(row.tokens)

    def _finish(self, row: _Row) -> Generation:
        end = len(row.tokens)
        while end > row.prompt_tokens and row.stopped_at_eos and row.tokens[end - 1] == self.eos:
            end -= 1
        new_tokens = end - row.prompt_tokens
        open_text = self.tokenizer.decode(row.tokens[row.open_start:end]).strip()
        sentences = list(row.sentences)
        if open_text:
            sentences[-1].text = open_text
        elif not sentences[-1].text:
            sentences = sentences[:-1]  # planned but never started
        if self.action_examples is not None:
            for sentence in sentences:
                sentence.examples = list(self.action_examples(sentence.action))
        continuation = self.tokenizer.decode(row.tokens[row.prompt_tokens:end])
        return Generation(row.prompt, continuation, sentences, new_tokens, row.stopped_at_eos)
