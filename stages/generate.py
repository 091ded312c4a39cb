"""Sample text with the planner in the loop and print it with its plan (`make generate PROMPT=...`).

The stage's body is `planner_lm.pipeline.generate.run_generate`; `--help` lists every option.
The same command, installed: `planner-lm generate`.
"""
from planner_lm.commands import command
from planner_lm.pipeline.generate import run_generate as run

main = command("generate")  # what `planner-lm generate` runs

if __name__ == "__main__":
    main()
