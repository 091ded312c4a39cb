"""Joint training step cost: what the planner adds to an LM step, per-sentence vs per-token planning.

Three variants of one optimisation step (forward, backward, Adam) on the same random batch of
128-token windows, with the demo's GPT-2 shape (4 layers, 256 wide, GPT-2's 50,257-token
vocabulary, adapters on layers 2-3, frozen base) unless told otherwise:

- `lm_only`: the conditioned LM with fixed action weights (no planner): the floor;
- `joint_per_sentence` (ours): the planner runs once per distinct target sentence of the batch on
  cached sentence embeddings, its soft weights are gathered per position;
- `joint_per_token`: the same planner run once per position (what expanding contexts per token
  before planning costs), to show why planning per sentence matters.

Steps are interleaved so load from other processes hits every variant alike. Prints JSON.

`--mode frozen_vs_plain` instead measures what `make real` pays per step: the frozen-base joint
step (adapters on all layers but the first two, per-layer codebooks, soft planner weights, Adam on
what trains) beside a plain forward+backward of the same base with every weight trainable, same
batch and precision, in tokens/s, for the SmolLM2-135M shape (random weights of its config; `--shape
demo`: the demo's GPT-2). Frozen weights get no gradient (requires_grad off), and nothing below the
first adapter builds an autograd graph, so the frozen step skips every weight gradient; bf16 base
weights (`--bf16-base`) only pay on hosts with native bf16.

    .venv/bin/python bench/bench_joint.py [--steps 5] [--batch-size 8] [--device cpu]
    .venv/bin/python bench/bench_joint.py --mode frozen_vs_plain --shape smollm2 --steps 3

`--mode designs` times the frozen-base joint step of each conditioning `make real` can choose, side
by side on the SmolLM2-135M shape: the paper's adapters on layers 2-29, the residual design (full
width, and through a rank-16 shared projection), and the residual design on the top half only
(layers 15-29: backward stops at layer 15, the lever that trades conditioned depth for time).

    .venv/bin/python bench/bench_joint.py --mode designs --steps 3

Every input is synthetic; `--device cuda` without a GPU is one line (exit 2). The report grows in
`--json` (default bench/out/joint.json) after the set-up and after every round of steps.
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from _common import add_json_option, bench_report

from planner_lm.errors import UserError
from planner_lm.hardware import cpu_flags, fast_precision
from planner_lm.models.base_lm import gpt2_config
from planner_lm.models.conditioning import ActionConditionedLM
from planner_lm.models.planner import Planner
from planner_lm.models.selection import select_weights


def time_variants(step: Callable[[str], float], variants: Sequence[str], steps: int, report) -> dict[str, float]:
    """Median seconds per variant: one untimed warm-up each, then `steps` interleaved rounds (so load
    from other processes hits every variant alike), the report saved after every round."""
    for variant in variants:
        step(variant)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(steps):
        for variant in variants:
            times[variant].append(step(variant))
        report["step_s_rounds"] = {v: [round(x, 4) for x in times[v]] for v in variants}
        report.save()
    return {v: statistics.median(times[v]) for v in variants}


def synthetic_batch(args: argparse.Namespace, device: torch.device, vocab: int):
    """Random token ids ``[B, T]``, each position's sentence (runs of ~tokens_per_sentence
    positions, numbered across the batch) and one random planner context per sentence."""
    b, t = args.batch_size, args.window
    input_ids = torch.randint(0, vocab, (b, t), device=device)
    per_window = -(-t // args.tokens_per_sentence)
    token_sentence = ((torch.arange(t, device=device) // args.tokens_per_sentence)[None]
                      + per_window * torch.arange(b, device=device)[:, None])
    contexts = torch.randn(b * per_window, args.context_sentences, args.embedding_dim, device=device)
    mask = torch.ones(b * per_window, args.context_sentences, dtype=torch.bool, device=device)
    return input_ids, token_sentence, contexts, mask


def autocast(device: torch.device, precision: str):
    """The Trainer's `bf16-mixed` as a context (weights and optimizer state stay as they are), or nothing for `32-true`."""
    if precision == "32-true":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16-mixed" else torch.float16)


def joint_update(lm: ActionConditionedLM, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor,
                 weights: torch.Tensor, precision: str = "32-true") -> None:
    """One conditioned LM step: loss (under `precision`), backward, Adam, and a device sync so the clock sees it all."""
    with autocast(input_ids.device, precision):
        loss = lm(input_ids, action_weights=weights, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if input_ids.device.type == "cuda":
        torch.cuda.synchronize()


def smollm2_base():
    """A randomly initialised model of SmolLM2-135M's config (Llama, 30 layers, 576 wide, 49,152 tokens)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)
    return LlamaForCausalLM(config)


def frozen_vs_plain(args: argparse.Namespace, device: torch.device, report) -> None:
    """The frozen-base joint step against a plain forward+backward of the same base (see module doc)."""
    from transformers import GPT2LMHeadModel

    make_base = smollm2_base if args.shape == "smollm2" else (
        lambda: GPT2LMHeadModel(gpt2_config(n_layer=4, n_embd=128, n_head=4, n_positions=args.window)))
    torch.manual_seed(0)
    plain = make_base().to(device).train()
    dtype = torch.bfloat16 if args.bf16_base else None
    frozen_base = make_base().to(device)
    if dtype is not None:
        frozen_base = frozen_base.to(dtype)
    codebook = F.normalize(torch.randn(args.num_actions, args.embedding_dim), dim=-1)
    lm = ActionConditionedLM(frozen_base, codebook).to(device).train()  # frozen base, layers 2.. conditioned
    planner = Planner(args.embedding_dim, args.num_actions, args.context_sentences).to(device).train()
    optimizer = torch.optim.Adam([p for p in [*lm.parameters(), *planner.parameters()] if p.requires_grad], lr=1e-3)
    b, t = args.batch_size, args.window
    input_ids, token_sentence, contexts, mask = synthetic_batch(args, device, plain.config.vocab_size)

    def step(variant: str) -> float:
        start = time.perf_counter()
        if variant == "plain_forward_backward":
            with autocast(device, args.precision):
                loss = plain(input_ids, labels=input_ids).loss
            loss.backward()
            plain.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
        else:
            with autocast(device, args.precision):
                weights = select_weights(planner(contexts, mask), "soft")[token_sentence]
            joint_update(lm, optimizer, input_ids, weights, args.precision)
        return time.perf_counter() - start

    trainable = sum(p.numel() for p in [*lm.parameters(), *planner.parameters()] if p.requires_grad)
    report.update({
        "shape": args.shape, "batch": [b, t], "precision": args.precision, "base_dtype": "bfloat16" if dtype is not None else "float32",
        "base_parameters": sum(p.numel() for p in plain.parameters()), "joint_trainable_parameters": trainable,
        "conditioned_layers": len(lm.conditioned_layers), "steps": args.steps,
    })
    report.save()
    median = time_variants(step, ("plain_forward_backward", "frozen_joint_step"), args.steps, report)
    report.update({
        "median_step_s": {v: round(x, 3) for v, x in median.items()},
        "tokens_per_s": {v: round(b * t / x, 1) for v, x in median.items()},
        "frozen_joint_over_plain": round(median["frozen_joint_step"] / median["plain_forward_backward"], 3),
    })


DESIGNS: dict[str, dict] = {
    "paper_layers_2_29": {},
    "residual_layers_2_29": {"conditioning": "residual"},
    "residual_rank16_layers_2_29": {"conditioning": "residual", "residual_rank": 16},
    "residual_layers_15_29": {"conditioning": "residual", "conditioned_layers": list(range(15, 30))},
}
"""The conditionings `--mode designs` times (ActionConditionedLM options over the SmolLM2 shape)."""


def designs(args: argparse.Namespace, device: torch.device, report) -> None:
    """The frozen joint step of each of `DESIGNS`, same batch, same planner, interleaved (see module doc)."""
    torch.manual_seed(0)
    codebook = F.normalize(torch.randn(args.num_actions, args.embedding_dim), dim=-1)
    planner = Planner(args.embedding_dim, args.num_actions, args.context_sentences).to(device).train()
    models, optimizers = {}, {}
    for name, options in DESIGNS.items():
        lm = ActionConditionedLM(smollm2_base().to(device), codebook, **options).to(device).train()
        with torch.no_grad():  # a residual that has started to move, so every design runs the same kernels
            for adapter in lm.adapters:
                adapter.weight.normal_(0, 1e-3)
        models[name] = lm
        optimizers[name] = torch.optim.Adam([p for p in [*lm.parameters(), *planner.parameters()] if p.requires_grad],
                                            lr=1e-3)
    b, t = args.batch_size, args.window
    input_ids, token_sentence, contexts, mask = synthetic_batch(args, device, 49152)

    def step(name: str) -> float:
        start = time.perf_counter()
        with autocast(device, args.precision):
            weights = select_weights(planner(contexts, mask), "soft")[token_sentence]
        joint_update(models[name], optimizers[name], input_ids, weights, args.precision)
        return time.perf_counter() - start

    report.update({"shape": "smollm2", "batch": [b, t], "precision": args.precision, "steps": args.steps,
                   "trainable_parameters": {name: sum(p.numel() for p in lm.parameters() if p.requires_grad)
                                            for name, lm in models.items()}})
    report.save()
    median = time_variants(step, tuple(DESIGNS), args.steps, report)
    first = next(iter(DESIGNS))
    report.update({
        "median_step_s": {v: round(x, 3) for v, x in median.items()},
        "tokens_per_s": {v: round(b * t / x, 1) for v, x in median.items()},
        "over_paper": {v: round(x / median[first], 3) for v, x in median.items()},
    })


def planner_overhead(args: argparse.Namespace, device: torch.device, report) -> None:
    """What the planner adds to an LM step, planning per sentence or per token (see module doc)."""
    torch.manual_seed(0)
    from transformers import GPT2LMHeadModel

    base = GPT2LMHeadModel(gpt2_config(n_layer=args.n_layer, n_embd=args.n_embd, n_head=4, n_positions=args.window))
    codebook = F.normalize(torch.randn(args.num_actions, args.embedding_dim), dim=-1)
    lm = ActionConditionedLM(base, codebook).to(device).train()
    planner = Planner(args.embedding_dim, args.num_actions, args.context_sentences).to(device).train()
    optimizer = torch.optim.Adam([p for p in [*lm.parameters(), *planner.parameters()] if p.requires_grad], lr=1e-4)

    b, t = args.batch_size, args.window
    input_ids, token_sentence, contexts, mask = synthetic_batch(args, device, base.config.vocab_size)
    num_sentences = len(contexts)

    def step(variant: str) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        if variant == "lm_only":
            weights = select_weights(None, "fixed", num_actions=args.num_actions, batch_shape=(b, t)).to(device)
        elif variant == "joint_per_sentence":
            logits = planner(contexts, mask)
            weights = select_weights(logits, "soft")[token_sentence]
        else:
            flat = token_sentence.reshape(-1)
            logits = planner(contexts[flat], mask[flat])
            weights = select_weights(logits, "soft").reshape(b, t, -1)
        joint_update(lm, optimizer, input_ids, weights)
        return time.perf_counter() - start

    report.update({"batch": [b, t], "steps": args.steps,
                   "planner_calls_per_batch": {"per_sentence": num_sentences, "per_token": b * t}})
    report.save()
    median = time_variants(step, ("lm_only", "joint_per_sentence", "joint_per_token"), args.steps, report)
    report.update({
        "median_step_s": {v: round(x, 4) for v, x in median.items()},
        "planner_overhead_per_sentence": round(median["joint_per_sentence"] / median["lm_only"] - 1, 4),
        "planner_overhead_per_token": round(median["joint_per_token"] / median["lm_only"] - 1, 4),
        "windows_per_s": {v: round(b / x, 2) for v, x in median.items()},
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("planner", "frozen_vs_plain", "designs"), default="planner",
                        help="planner: what the planner adds to a step; frozen_vs_plain: the frozen-base joint step "
                             "against a plain forward+backward of the same base; designs: the joint step of each "
                             "conditioning make real can choose")
    parser.add_argument("--shape", choices=("smollm2", "demo"), default="smollm2", help="base shape (frozen_vs_plain)")
    parser.add_argument("--bf16-base", action="store_true", help="frozen base in bf16 (frozen_vs_plain; native-bf16 hosts)")
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed", "16-mixed"), default=None,
                        help="autocast of both variants (frozen_vs_plain); default: what the stages pick on this host "
                             "(bf16-mixed where bf16 is native, else 32-true)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per batch")
    parser.add_argument("--window", type=int, default=128, help="tokens per window")
    parser.add_argument("--tokens-per-sentence", type=int, default=25, help="average sentence length in tokens")
    parser.add_argument("--num-actions", type=int, default=128, help="k")
    parser.add_argument("--embedding-dim", type=int, default=384, help="sentence embedding size (MiniLM: 384)")
    parser.add_argument("--context-sentences", type=int, default=6, help="planner context S")
    parser.add_argument("--n-layer", type=int, default=4, help="GPT-2 layers")
    parser.add_argument("--n-embd", type=int, default=256, help="GPT-2 width")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    add_json_option(parser, "joint")
    args = parser.parse_args()
    args.precision = args.precision or fast_precision()
    torch.set_num_threads(args.threads)
    name = {"planner": "joint_step", "frozen_vs_plain": "frozen_joint_vs_plain", "designs": "joint_designs"}[args.mode]
    with bench_report(name, args.json, mode=args.mode, host=platform.node(), cpu_flags=cpu_flags(),
                      threads=args.threads, torch=torch.__version__) as report:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: no CUDA device here; pass --device cpu")
        report["device"] = str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)
        {"planner": planner_overhead, "frozen_vs_plain": frozen_vs_plain, "designs": designs}[args.mode](args, device, report)


if __name__ == "__main__":
    main()
