"""`planner-lm <command> [options]`: the one command line of every stage, for pip users and `make` alike.

`planner-lm --help` lists the commands; `planner-lm <command> --help` shows that command's own
options. Stages take the options of `planner_lm.cli` (`--config FILE` any number of times, dotted
overrides such as `--model.num_layers 2`, `--print_config`); without `--config` they run with their
built-in defaults, the offline demo corpus and encoder. `python -m planner_lm <command>`, the
Makefile and `stages/<stage>.py` all go through `command()` below.

`planner-lm-eval` (`harness_main`) is lm-evaluation-harness's own command line with the
`planner-lm` model registered.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from importlib import import_module
from typing import Any, NamedTuple


class Command(NamedTuple):
    target: str  # "module:function"; imported only when the command runs, so `--help` stays fast
    summary: str  # the line `planner-lm --help` shows
    stage: bool = True  # a stage body `run_<stage>(args)`, shown errors as one line by `stage_main`


COMMANDS: dict[str, Command] = {
    "prepare": Command("planner_lm.pipeline.prepare:run_prepare",
                       "corpus -> train/val/test documents with sentence spans (0_prepare)"),
    "embed": Command("planner_lm.pipeline.embed:run_embed",
                     "one unit-norm vector per sentence from a frozen sentence encoder (1_embed)"),
    "cluster": Command("planner_lm.pipeline.cluster:run_cluster",
                       "k-means over the embeddings: the codebook of writing actions (2_cluster)"),
    "pretrain-lm": Command("planner_lm.pipeline.pretrain_lm:run_pretrain_lm",
                           "train the offline base LM, a small GPT-2, from scratch (lm)"),
    "pretrain-planner": Command("planner_lm.pipeline.pretrain_planner:run_pretrain_planner",
                                "pretrain the planner on next-action prediction (3_planner)"),
    "finetune-joint": Command("planner_lm.pipeline.finetune_joint:run_finetune_joint",
                              "planner + action-conditioned LM fine-tuned end to end (4_joint-<selection>)"),
    "evaluate": Command("planner_lm.pipeline.evaluate:run_evaluate",
                        "perplexity, planner accuracy and structure for every finished joint run (5_eval)"),
    "generate": Command("planner_lm.pipeline.generate:run_generate",
                        "sample text with the planner in the loop, printed with its plan"),
    "publish": Command("planner_lm.publish:main",
                       "save a joint run as Hugging Face models with model cards; --repo pushes them", stage=False),
    "compare": Command("planner_lm.evaluation.compare:main",
                       "one table of a selection across evaluated run directories (variants)", stage=False),
}

PROG = "planner-lm"


def _resolve(target: str) -> Callable[..., Any]:
    module, _, name = target.partition(":")
    return getattr(import_module(module), name)


def command(name: str) -> Callable[[Sequence[str] | None], Any]:
    """The entry point of one command: `main(args)` (None reads `sys.argv[1:]`), user errors as one line."""
    from planner_lm.cli import stage_main

    spec = COMMANDS[name]
    function = _resolve(spec.target)
    return stage_main(function) if spec.stage else function


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} <command> [options]   ({PROG} <command> --help: that command's options)", "",
             "Teach a language model to plan: the stages of a run, in order, then sharing and comparing.", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {spec.summary}" for name, spec in COMMANDS.items()]
    lines += ["", "Stages read --config FILE (repeatable; a checkout has configs/<stage>.yaml and presets in",
              "configs/presets/) and overrides such as --run_dir runs/mine or --model.num_layers 2; without",
              "--config they use built-in defaults (offline demo corpus and encoder, one epoch).",
              "Score a joint run with lm-evaluation-harness: planner-lm-eval --model planner-lm ..."]
    return "\n".join(lines)


def _program() -> str:
    """How the user called us, for the usage lines of a command's own help."""
    called = os.path.basename(sys.argv[0]) if sys.argv else PROG
    return "python -m planner_lm" if called == "__main__.py" else PROG


def main(argv: Sequence[str] | None = None) -> None:
    """`planner-lm <command> ...`: run the command with the remaining arguments."""
    from planner_lm.errors import EXIT_USER_ERROR

    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    if argv[0] == "--version":
        from importlib.metadata import version

        print(f"{PROG} {version('planner-lm')}")
        return
    name, rest = argv[0].replace("_", "-"), argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; one of: {', '.join(COMMANDS)} (see `{PROG} --help`)",
              file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    run = command(name)
    if from_command_line:
        # the command parses sys.argv itself, so its help reads `planner-lm <command> ...` and
        # LightningCLI sees no arguments given twice
        sys.argv = [f"{_program()} {name}", *rest]
        result = run(None)
    else:
        result = run(rest)
    if isinstance(result, int) and result:
        sys.exit(result)


def harness_main(argv: Sequence[str] | None = None) -> None:
    """`planner-lm-eval`: lm-evaluation-harness's command line with the `planner-lm` model registered.

    The harness (0.4.x) finds models by import only, so a plain `lm_eval` does not see ours; this
    registers it, then hands every argument to the harness's own CLI. The import sits inside
    `friendly_errors` so a missing `lm-eval` is one line, not a traceback.
    """
    from planner_lm.errors import friendly_errors

    with friendly_errors():
        from planner_lm.harness import main as harness

    harness(argv)


if __name__ == "__main__":
    main()
