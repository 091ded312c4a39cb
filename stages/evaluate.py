"""Stage 5: the comparison table: perplexity per run and code source, planner accuracy,
structure of planner-in-the-loop generations (`make evaluate`).

The stage's body is `planner_lm.pipeline.evaluate.run_evaluate`; `--help` lists every option.
The same command, installed: `planner-lm evaluate`.
"""
from planner_lm.commands import command
from planner_lm.pipeline.evaluate import run_evaluate as run

main = command("evaluate")  # what `planner-lm evaluate` runs

if __name__ == "__main__":
    main()
