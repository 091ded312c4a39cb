"""The project's GPU check: one short run on a lent GPU (H100/H200) that prints what scale costs.

Measures, with the project's own code paths and randomly initialised models of the real shapes
(no downloads, nothing to carry but this repository):
- embed: sentences/s of a MiniLM-L6-shaped encoder (`sentence_vectors.encode_batch`'s forward) in
  bf16 autocast on length-sorted batches;
- k-means: seconds per Lloyd iteration at 1,000,000 × 768, k = 1024 (`models.kmeans.torch_assign`
  plus the centroid update);
- joint step (planner + conditioned LM, forward + backward + Adam, bf16 autocast, full fine-tuning)
  for GPT-2-small- and OLMo-1B-shaped bases: tokens/s, MFU (6 × parameters × tokens/s over the
  GPU's dense bf16 peak) and peak memory;
- stride-1 evaluation tokens/s (`evaluation.perplexity.causal_lm_logprobs`, one scored token per
  128-token window) on the GPT-2-small shape.

    bash bench/gpu_check.sh            # on the GPU machine (about 3-4 minutes on an H200)
    bash bench/gpu_check.sh --cpu      # the same script at toy sizes: proves it runs anywhere

Prints one line per figure and, last, one JSON object; the JSON is also kept, rewritten after
every section, in `--json` (default bench/out/gpu_check.json; on the device: --json $OUT/gpu_check.json).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from _common import add_json_option, bench_report

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
"""Dense bf16 tensor-core peak of the GPU (vendor figure) that MFU is measured against."""

SHAPES = {
    "gpt2-small": dict(model_type="gpt2", n_layer=12, n_embd=768, n_head=12, vocab_size=50257),
    "olmo-1b": dict(model_type="olmo", num_hidden_layers=16, hidden_size=2048, num_attention_heads=16,
                    num_key_value_heads=16, intermediate_size=8192, vocab_size=50304),
}
TOY = {
    "gpt2-small": dict(model_type="gpt2", n_layer=3, n_embd=64, n_head=2, vocab_size=1000),
    "olmo-1b": dict(model_type="olmo", num_hidden_layers=3, hidden_size=64, num_attention_heads=2,
                    num_key_value_heads=2, intermediate_size=128, vocab_size=1000),
}


def timed(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up (synchronised on CUDA)."""
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start
    once()
    return statistics.median(once() for _ in range(repeats))


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def check_embed(device: torch.device, toy: bool) -> dict:
    from transformers import BertConfig, BertModel

    config = BertConfig(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536)
    encoder = BertModel(config).to(device).eval()
    sentences, batch = (512, 64) if toy else (65536, 256)
    lengths = torch.randint(8, 64, (sentences,)).sort(descending=True).values  # length-sorted like the stage

    @torch.no_grad()
    def run() -> None:
        for start in range(0, sentences, batch):
            width = int(lengths[start])
            ids = torch.randint(1000, 20000, (min(batch, sentences - start), width), device=device)
            mask = torch.arange(width, device=device)[None] < lengths[start:start + batch, None].to(device)
            with autocast(device):
                hidden = encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
            pooled = (hidden.float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            F.normalize(pooled, dim=1)

    seconds = timed(run, device, 2)
    return {"sentences": sentences, "batch": batch, "sentences_per_s": round(sentences / seconds, 1)}


def check_kmeans(device: torch.device, toy: bool) -> dict:
    from planner_lm.models.kmeans import accumulate, lloyd_update, torch_assign

    n, dim, k = (20000, 64, 64) if toy else (1_000_000, 768, 1024)
    x = F.normalize(torch.randn(n, dim, device=device), dim=1)
    centroids = x[torch.randperm(n, device=device)[:k]].clone()

    def iteration() -> None:
        ids, _ = torch_assign(x, centroids, rows_per_chunk=65536)
        sums = torch.zeros(k, dim, dtype=torch.float64, device=device)
        counts = torch.zeros(k, dtype=torch.float64, device=device)
        accumulate(x, ids, sums, counts)
        centroids.copy_(lloyd_update(sums, counts, centroids)[0])

    seconds = timed(iteration, device, 3)
    return {"n": n, "dim": dim, "k": k, "seconds_per_iteration": round(seconds, 4)}


def check_joint(name: str, spec: dict, device: torch.device, toy: bool, peak: float | None) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from planner_lm.models.conditioning import ActionConditionedLM
    from planner_lm.models.planner import Planner
    from planner_lm.models.selection import select_weights

    spec = dict(spec)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    base = AutoModelForCausalLM.from_config(config)
    k, dim, context = (16, 32, 6) if toy else (1024, 768, 6)
    batch, window = (2, 32) if toy else (64, 128)
    codebook = F.normalize(torch.randn(k, dim), dim=1)
    lm = ActionConditionedLM(base, codebook, base_mode="full").to(device).train()
    planner = Planner(dim, k, context).to(device).train()
    parameters = [p for p in [*lm.parameters(), *planner.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5, fused=device.type == "cuda")
    sentences = batch * window // 25  # ~25 tokens per sentence
    ids = torch.randint(0, config.vocab_size, (batch, window), device=device)
    plan = torch.randint(0, sentences, (batch, window), device=device)
    contexts = torch.randn(sentences, context, dim, device=device)
    mask = torch.ones(sentences, context, dtype=torch.bool, device=device)

    def step() -> None:
        with autocast(device):
            weights = select_weights(planner(contexts, mask), "soft")[plan]
            loss = lm(input_ids=ids, action_weights=weights, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, device, 2 if toy else 5)
    tokens_per_s = batch * window / seconds
    count = sum(p.numel() for p in parameters)
    result = {"parameters": count, "batch": batch, "window": window, "tokens_per_s": round(tokens_per_s, 1)}
    if peak:
        result["mfu"] = round(6 * count * tokens_per_s / (peak * 1e12), 4)
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def check_eval(device: torch.device, toy: bool) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from planner_lm.evaluation.perplexity import causal_lm_logprobs

    spec = dict(TOY["gpt2-small"] if toy else SHAPES["gpt2-small"])
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec)).to(device).eval()
    windows, window = (16, 32) if toy else (512, 128)
    ids = torch.randint(0, model.config.vocab_size, (windows, window), device=device)
    mask = torch.ones_like(ids)

    @torch.no_grad()
    def run() -> None:
        with autocast(device):
            causal_lm_logprobs(model, ids, mask, 1)

    seconds = timed(run, device, 3)
    return {"windows": windows, "window": window, "tokens_per_s": round(windows / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="toy sizes on the CPU: proves the script, measures nothing")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: embed,kmeans,joint,eval")
    add_json_option(parser, "gpu_check")
    args = parser.parse_args()
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    toy = device.type == "cpu"
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    peak = next((v for key, v in PEAK_BF16_TFLOPS.items() if key in name), None) if device.type == "cuda" else None
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    with bench_report("gpu_check", args.json, device=name, toy_sizes=toy, torch=torch.__version__,
                      peak_bf16_tflops=peak) as report:
        run_sections(args, device, toy, peak, report)


def run_sections(args: argparse.Namespace, device: torch.device, toy: bool, peak: float | None, report) -> None:
    """Each section's figures go into the report (saved) as soon as it ends."""
    skip = set(filter(None, args.skip.split(",")))
    sections = [("embed", lambda: check_embed(device, toy)), ("kmeans", lambda: check_kmeans(device, toy)),
                *((f"joint_{shape}", lambda shape=shape: check_joint(shape, (TOY if toy else SHAPES)[shape], device,
                                                                      toy, peak)) for shape in SHAPES),
                ("eval_stride1", lambda: check_eval(device, toy))]
    for section, run in sections:
        if section.split("_")[0] in skip:
            continue
        started = time.perf_counter()
        try:
            report[section] = run()
        except torch.cuda.OutOfMemoryError as err:  # one section's failure leaves the others' figures
            report[section] = {"error": f"out of memory: {str(err).splitlines()[0]}"}
        report[section]["seconds"] = round(time.perf_counter() - started, 1)
        print(f"{section}: {json.dumps(report[section])}", flush=True)
        report.save()
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
