"""`make generate`: load a finished joint run and sample text with its plan.

Everything is read from the run directory (`planner_lm.run_folder.RunFolder`): the conditioned LM
and its tokenizer (`4_joint-<selection>/lm`), its planner (its own, else the pretrained one), the
sentence encoder with the embed stage's settings, and, for showing what an action means, the
training sentences nearest to each centroid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner_lm import sentence_vectors
from planner_lm.artifacts import atomic_write_text
from planner_lm.errors import UserError
from planner_lm.generation import PlannerGenerator, SamplingConfig
from planner_lm.generation_plan import Generation
from planner_lm.generation_plan import ActionExamples, format_plan
from planner_lm.hardware import resolve_device
from planner_lm.models.selection import GENERATION_SELECTIONS, generation_selection
from planner_lm.run_folder import RunFolder
from planner_lm.tokenization import load_tokenizer


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
        conditioning: soft, hard, fixed, boundary, position, uniform or none; default: what the run was trained with.
        examples: example training sentences shown per action (0 = none, faster start).
        seed: sampling seed.
        device: `auto` (CUDA when available), `cpu` or `cuda[:i]`.
        output: also write the generations (text + plan) as JSON to this file (a new one: never written over).
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
    from planner_lm.models.conditioning import ActionConditionedLM
    from planner_lm.models.planner import Planner

    folder = RunFolder(run_dir)
    run = folder.joint_run(selection)
    device_ = resolve_device(device)
    lm = ActionConditionedLM.from_pretrained(run.lm_dir).to(device_).eval()
    tokenizer = load_tokenizer(str(folder.tokenizer_dir(run)))
    planner_path = folder.planner_path_for(run)
    planner = Planner.from_pretrained(planner_path).to(device_).eval() if planner_path is not None else None
    encode = sentence_vectors.load_sentence_encoder(folder.encoder_settings(), device_)
    lookup = None
    if examples > 0:
        lo, hi = folder.prepared.sentence_range("train")
        lookup = ActionExamples(folder.prepared.sentence_texts("train"), folder.embeddings()[lo:hi],
                                folder.actions()[lo:hi], folder.codebook(), per_action=examples)
    generator = PlannerGenerator(lm, tokenizer, encode, folder.num_actions, planner=planner, action_examples=lookup)
    return generator, generation_selection(selection), run.planner_temperature


def generate_text(cfg: GenerateConfig) -> list[Generation]:
    """Generate, print text and plan, optionally write JSON."""
    if cfg.num_samples < 1:
        raise UserError(f"num_samples must be >= 1, got {cfg.num_samples}")
    if cfg.conditioning is not None and cfg.conditioning not in GENERATION_SELECTIONS:
        raise UserError(f"conditioning must be one of {', '.join(GENERATION_SELECTIONS)}, got {cfg.conditioning!r}")
    if cfg.output and (Path(cfg.output).exists() or Path(cfg.output).is_symlink()):  # never written over
        raise UserError(f"--output {cfg.output} already exists; name a new file (nothing was overwritten)")
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


def run_generate(args: list[str] | None = None) -> list[Generation]:
    """`stages/generate.py`: parse the command line (YAML configs + overrides) and generate."""
    from planner_lm.cli import parse_config

    return generate_text(parse_config(GenerateConfig, "Generate text that follows (and can be steered by) a plan.",
                                      args))
