"""Stage 1: one unit-norm vector per sentence with a frozen sentence encoder (`make embed`).

The stage's body is `planner_lm.pipeline.embed.run_embed`; `--help` lists every option.
The same command, installed: `planner-lm embed`.
"""
from planner_lm.commands import command
from planner_lm.pipeline.embed import run_embed as run

main = command("embed")  # what `planner-lm embed` runs

if __name__ == "__main__":
    main()
