"""Step cost of candidate demo base LMs: picks the size of `pretrain-lm`'s demo preset.

For each GPT-2 shape (layers x width, GPT-2's 50,257-token vocabulary, tied embeddings) it times
one optimisation step on a batch of 128-token windows:

- `pretrain`: forward, backward and AdamW over all weights (the `pretrain-lm` stage);
- `conditioned_frozen`: the same model frozen inside `ActionConditionedLM` (adapters on all
  layers but the first two, soft action weights): what every `finetune-joint` run pays per step.

Shapes are interleaved round by round so load from other processes hits each alike; the median
is reported. Prints JSON, kept in `--json` (default bench/out/pretrain_lm.json) after every round.

    .venv/bin/python bench/bench_pretrain_lm.py [--shapes 2x128,4x128,4x256] [--steps 5] [--batch-size 8]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

from _common import add_json_option, bench_report
from planner_lm.hardware import cpu_flags
from planner_lm.models.base_lm import gpt2_config
from planner_lm.models.conditioning import ActionConditionedLM


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor, **kwargs) -> float:
    started = time.perf_counter()
    logits = model(ids, **kwargs).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="2x128,4x128,4x256", help="comma-separated LAYERSxWIDTH shapes")
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per step")
    parser.add_argument("--window", type=int, default=128, help="tokens per window")
    parser.add_argument("--actions", type=int, default=64, help="codebook size K for the conditioned step")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    add_json_option(parser, "pretrain_lm")
    args = parser.parse_args()
    with bench_report("pretrain_lm_step", args.json, batch=[args.batch_size, args.window], threads=args.threads,
                      cpu=platform.processor() or platform.machine(), cpu_flags=cpu_flags()) as report:
        measure(args, report)


def measure(args: argparse.Namespace, report) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    runs = {}
    for shape in args.shapes.split(","):
        layers, width = (int(x) for x in shape.split("x"))
        config = gpt2_config(n_layer=layers, n_embd=width, n_head=max(1, width // 64), dropout=0.0)
        pretrain = GPT2LMHeadModel(config)
        frozen = ActionConditionedLM(GPT2LMHeadModel(config), torch.randn(args.actions, 384),
                                     conditioned_layers=list(range(min(2, layers - 1), layers)))
        runs[shape] = {
            "pretrain": (pretrain, torch.optim.AdamW(pretrain.parameters(), 1e-3), {}),
            "conditioned_frozen": (frozen, torch.optim.AdamW([p for p in frozen.parameters() if p.requires_grad], 1e-3),
                                   {"action_weights": torch.softmax(torch.randn(args.batch_size, args.window,
                                                                                args.actions), -1)}),
            "parameters_m": round(sum(p.numel() for p in pretrain.parameters()) / 1e6, 2),
        }
    ids = torch.randint(0, 50257, (args.batch_size, args.window))
    times: dict[str, dict[str, list[float]]] = {s: {"pretrain": [], "conditioned_frozen": []} for s in runs}
    for round_ in range(args.steps + 1):
        for shape, entry in runs.items():
            for name in ("pretrain", "conditioned_frozen"):
                model, optimizer, kwargs = entry[name]
                seconds = _step(model, optimizer, ids, **kwargs)
                if round_:  # the first round warms up
                    times[shape][name].append(seconds)
        if round_:
            report.update({
                "rounds": round_,
                "load_average_1m": round(os.getloadavg()[0], 2),
                "shapes": {
                    shape: {
                        "parameters_m": runs[shape]["parameters_m"],
                        **{f"{name}_s_per_step": round(statistics.median(values), 3)
                           for name, values in times[shape].items()},
                    }
                    for shape in runs
                },
            })
            report.save()

if __name__ == "__main__":
    main()
