"""`make generate`: load a finished joint run and sample text with its plan.

Everything is read from the run directory: the conditioned LM and its tokenizer
(`4_joint-<selection>/lm`), its planner (its own `planner.pt`, else the pretrained one in
`3_planner`), the sentence encoder named by the embed stage, and, for showing what an action
means, the training sentences nearest to each centroid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from planner_lm.artifacts import atomic_write_text, read_manifest, stage_dir
from planner_lm.errors import UserError
from planner_lm.generation import (
    GENERATION_CONDITIONING,
    GENERATION_SELECTIONS,
    ActionExamples,
    Generation,
    PlannerGenerator,
    SamplingConfig,
    format_plan,
    load_sentence_encoder,
    run_temperature,
)



@dataclass
class GenerateConfig:
    """Sample from a conditioned LM with the planner in the loop.

    Args:
        run_dir: run directory holding the stages.
        selection: which joint run to load: `<run_dir>/4_joint-<selection>` (make: SELECTION=...).
        prompt: text to continue (may be empty).
        plan: actions to force, comma-separated, from the sentence the prompt leaves open
            ("3,17,5"); `?` lets the planner choose one sentence ("3,?,5"). Empty = planner only.
        num_samples: how many continuations of the prompt to sample (one batch).
        max_new_tokens: tokens to generate per sample.
        temperature: token sampling temperature; 0 = greedy.
        top_p: nucleus sampling threshold (1 = off).
        conditioning: soft, hard, fixed, boundary, uniform or none; default: what the run was trained with.
        examples: example training sentences shown per action (0 = none, faster start).
        seed: sampling seed.
        device: `auto` (CUDA when available), `cpu` or `cuda[:i]`.
        output: also write the generations (text + plan) as JSON to this file.
    """

    run_dir: str = "runs/demo"
    selection: str = "soft"
    prompt: str = "The Moon is"
    plan: str = ""
    num_samples: int = 1
    max_new_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 0.95
    conditioning: str | None = None
    examples: int = 2
    seed: int = 0
    device: str = "auto"
    output: str | None = None


def parse_plan(text: str, num_actions: int) -> list[int | None]:
    """ "3,?,5" → [3, None, 5]; raises UserError on anything else."""
    plan: list[int | None] = []
    for item in (p.strip() for p in text.replace(" ", ",").split(",")):
        if not item:
            continue
        if item in ("?", "_", "*"):
            plan.append(None)
            continue
        if not item.lstrip("-").isdigit() or not 0 <= int(item) < num_actions:
            raise UserError(f"plan entry {item!r} is not an action id in 0..{num_actions - 1} or '?'")
        plan.append(int(item))
    return plan


def load_generator(run_dir: str | Path, selection: str = "soft", device: str = "auto",
                   examples: int = 2) -> tuple[PlannerGenerator, str, float]:
    """A ready `PlannerGenerator` for `<run_dir>/4_joint-<selection>`, its default conditioning and
    the planner temperature the run was trained with."""
    from planner_lm.evaluation.evaluate import resolve_device
    from planner_lm.models.base_lm import load_tokenizer
    from planner_lm.models.conditioning import ActionConditionedLM
    from planner_lm.models.planner import Planner
    from planner_lm.prepared import PreparedCorpus

    run_dir = Path(run_dir)
    joint_dir = run_dir / f"4_joint-{selection}"
    if not (joint_dir / "manifest.json").is_file():
        finished = sorted(p.name[len("4_joint-"):] for p in run_dir.glob("4_joint-*") if (p / "manifest.json").is_file())
        hint = f" (finished: {', '.join(finished)})" if finished else ""
        raise UserError(f"{joint_dir} is not a finished joint run{hint}; run `make finetune-joint` "
                        f"(or `make baselines`), or choose another SELECTION")
    joint = read_manifest(joint_dir, "finetune_joint")
    embed = read_manifest(stage_dir(run_dir, "embed"), "embed")
    cluster = read_manifest(stage_dir(run_dir, "cluster"), "cluster")
    num_actions = int(cluster.fact("num_actions"))
    joint.require("num_actions", num_actions, "joint run vs codebook")
    device_ = resolve_device(device)

    lm = ActionConditionedLM.from_pretrained(joint_dir / "lm").to(device_).eval()
    tokenizer_dir = joint_dir / "lm" if (joint_dir / "lm" / "tokenizer_config.json").is_file() \
        else stage_dir(run_dir, "pretrain_lm")
    tokenizer = load_tokenizer(str(tokenizer_dir))
    planner_path = joint_dir / "planner.pt"
    if not planner_path.is_file():
        planner_path = stage_dir(run_dir, "pretrain_planner") / "planner.pt"
    planner = Planner.from_pretrained(planner_path).to(device_).eval() if planner_path.is_file() else None
    encode = load_sentence_encoder(str(embed.fact("encoder")), device_)

    lookup = None
    if examples > 0:
        prepared = PreparedCorpus(stage_dir(run_dir, "prepare"))
        lo, hi = prepared.sentence_range("train")
        lookup = ActionExamples(
            prepared.sentence_texts("train"),
            np.load(embed.dir / "embeddings.npy", mmap_mode="r")[lo:hi],
            np.load(cluster.dir / "actions.npy", mmap_mode="r")[lo:hi],
            np.load(cluster.dir / "centroids.npy"),
            per_action=examples,
        )
    generator = PlannerGenerator(lm, tokenizer, encode, num_actions, planner=planner, action_examples=lookup)
    return generator, GENERATION_CONDITIONING.get(selection, "soft"), run_temperature(joint)


def run_generate(cfg: GenerateConfig) -> list[Generation]:
    """Generate, print text and plan, optionally write JSON."""
    if cfg.num_samples < 1:
        raise UserError(f"num_samples must be >= 1, got {cfg.num_samples}")
    if cfg.conditioning is not None and cfg.conditioning not in GENERATION_SELECTIONS:
        raise UserError(f"conditioning must be one of {', '.join(GENERATION_SELECTIONS)}, got {cfg.conditioning!r}")
    generator, default, planner_temperature = load_generator(cfg.run_dir, cfg.selection, cfg.device, cfg.examples)
    plan = parse_plan(cfg.plan, generator.num_actions)
    conditioning = cfg.conditioning or default
    if plan and conditioning == "none":
        raise UserError("a plan cannot steer the unconditioned LM (SELECTION=none); pick a conditioned run")
    try:
        sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                  selection=conditioning, planner_temperature=planner_temperature,
                                  seed=cfg.seed)
        generations = generator.generate([cfg.prompt] * cfg.num_samples, [plan] * cfg.num_samples, sampling)
    except ValueError as err:  # bad sampling settings, or a plan needed without a planner
        raise UserError(str(err)) from err
    for i, generation in enumerate(generations):
        if cfg.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(format_plan(generation, show_examples=cfg.examples))
    if cfg.output:
        payload: list[dict[str, Any]] = [g.as_dict() for g in generations]
        atomic_write_text(Path(cfg.output), json.dumps(payload, indent=2) + "\n")
    return generations
