"""Throughput of the sliding-window perplexity protocol; prints JSON.

Scores the same synthetic documents with a GPT-2 of the demo size at several strides (1 = the
papers' exact protocol) and batch sizes, and checks that batching does not change the result.
At stride 1 it compares, side by side (alternating, medians of `--repeats`), the output layer
at every position of each window (`full_logits`, what evaluation did before) against only at
the positions that are scored (`trimmed`, `logits_to_keep`), and checks their PPL is the same.

    .venv/bin/python bench/bench_eval.py [--docs 24] [--device cpu] [--layers 4 --width 256]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import statistics

from planner_lm.hardware import cpu_flags
from planner_lm.evaluation.perplexity import (ScoringDocument, causal_lm_logprobs, next_token_logprobs,
                                             sliding_window_nll)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=24, help="synthetic documents to score")
    parser.add_argument("--doc_tokens", type=int, default=256, help="tokens per document")
    parser.add_argument("--window", type=int, default=128, help="window length (the papers: 128)")
    parser.add_argument("--layers", type=int, default=4, help="GPT-2 layers")
    parser.add_argument("--width", type=int, default=256, help="GPT-2 hidden size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of the stride-1 comparison")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    config = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=max(1, args.width // 64),
                        n_positions=args.window)
    model = GPT2LMHeadModel(config).to(device).eval()
    docs = [ScoringDocument(torch.randint(0, config.vocab_size, (args.doc_tokens,)),
                            torch.zeros(args.doc_tokens, dtype=torch.long)) for _ in range(args.docs)]
    tokens = sum(d.num_targets for d in docs)

    def scorer(ids, mask, cond, keep):
        return causal_lm_logprobs(model, ids, mask, keep)

    def full_logits(ids, mask, cond, keep):
        return next_token_logprobs(model(input_ids=ids, attention_mask=mask).logits, ids)[:, -keep:]

    def timed(score, stride: int, batch_size: int, subset=docs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        tick = time.perf_counter()
        result = sliding_window_nll(subset, score, window=args.window, stride=stride, batch_size=batch_size,
                                    device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - tick, result

    def measure(stride: int, batch_size: int) -> dict:
        seconds, result = timed(scorer, stride, batch_size)
        return {"stride": stride, "batch_size": batch_size, "seconds": round(seconds, 3),
                "tokens_per_s": round(tokens / seconds, 1), "ppl": result.ppl}

    runs = [measure(args.window - 1, 32), measure(64, 32), measure(1, 64)]
    seconds: dict[str, list[float]] = {"full_logits": [], "trimmed": []}
    ppl: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, score in (("full_logits", full_logits), ("trimmed", scorer)):
            elapsed, result = timed(score, 1, 64)
            seconds[name].append(elapsed)
            ppl[name] = result.ppl
    stride1 = {name: {"median_s": round(statistics.median(values), 3),
                      "tokens_per_s": round(tokens / statistics.median(values), 1), "ppl": ppl[name]}
               for name, values in seconds.items()}
    # the same stride-1 protocol one window at a time, on a subset (it is slow)
    subset = docs[: max(1, args.docs // 8)]
    sub_tokens = sum(d.num_targets for d in subset)
    elapsed, one = timed(scorer, 1, 1, subset)
    unbatched = sub_tokens / elapsed
    batched = sliding_window_nll(subset, scorer, window=args.window, stride=1, batch_size=64, device=device)
    print(json.dumps({
        "bench": "sliding-window perplexity",
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "host": platform.node(), "cpu_flags": cpu_flags(), "threads": args.threads,
        "model": {"layers": args.layers, "width": args.width, "window": args.window},
        "docs": args.docs, "tokens": tokens,
        "runs": runs,
        "stride1_unbatched_tokens_per_s": round(unbatched, 1),
        "stride1_batching_speedup": round(runs[2]["tokens_per_s"] / unbatched, 1),
        "stride1_batched_vs_unbatched_ppl_rel_diff": abs(batched.ppl / one.ppl - 1),
        "stride1_output_layer": stride1,
        "stride1_trimmed_speedup": round(statistics.median(seconds["full_logits"]) / statistics.median(seconds["trimmed"]), 2),
        "stride1_trimmed_vs_full_ppl_rel_diff": abs(ppl["trimmed"] / ppl["full_logits"] - 1),
    }, indent=2))


if __name__ == "__main__":
    main()
