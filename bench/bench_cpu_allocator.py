"""Training-step time of the demo LM on CPU with and without transparent huge pages for tensors.

Runs the same GPT-2 step (4 layers x 128, GPT-2's 50,257-token vocabulary, batch 8 x 128) in
fresh processes, alternating THP_MEM_ALLOC_ENABLE=0/1, and prints medians and their ratio as JSON
(kept in `--json`, default bench/out/cpu_allocator.json, after every pair of processes).
`planner_lm` sets THP_MEM_ALLOC_ENABLE=1 unless the environment says otherwise.

    .venv/bin/python bench/bench_cpu_allocator.py [--repeats 3] [--steps 12]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

from _common import add_json_option, bench_report
from planner_lm.hardware import cpu_flags

STEP = r'''
import time, torch
from transformers import GPT2Config, GPT2LMHeadModel
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=50257, n_positions=1024))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randint(0, 50257, (8, 128))
times = []
for _ in range(STEPS):
    start = time.perf_counter()
    model(x, labels=x).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - start)
print(sorted(times[2:])[len(times[2:]) // 2])
'''


def step_seconds(thp: bool, steps: int) -> float:
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1" if thp else "0"}
    out = subprocess.run([sys.executable, "-c", STEP.replace("STEPS", str(steps))], env=env, check=True,
                         capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="processes per setting (alternating)")
    parser.add_argument("--steps", type=int, default=12, help="training steps per process (2 warm-up)")
    add_json_option(parser, "cpu_allocator")
    args = parser.parse_args()
    runs: dict[str, list[float]] = {"default_pages": [], "huge_pages": []}
    with bench_report("cpu_allocator", args.json, model="gpt2 4x128, vocab 50257, batch 8x128, AdamW",
                      threads=os.cpu_count(), cpu_flags=cpu_flags()) as report:
        for _ in range(args.repeats):
            runs["default_pages"].append(step_seconds(False, args.steps))
            runs["huge_pages"].append(step_seconds(True, args.steps))
            medians = {name: statistics.median(values) for name, values in runs.items()}
            report.update({
                "median_step_s": {k: round(v, 3) for k, v in medians.items()},
                "speedup": round(medians["default_pages"] / medians["huge_pages"], 2),
                "runs_s": {k: [round(v, 3) for v in values] for k, values in runs.items()},
            })
            report.save()

if __name__ == "__main__":
    main()
