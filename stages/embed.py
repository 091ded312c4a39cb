"""Stage 1: one unit-norm vector per sentence with a frozen sentence encoder (`make embed`).

The stage's body is `planner_lm.pipeline.embed.run_embed`; `--help` lists every option.
"""
from planner_lm.cli import stage_main
from planner_lm.pipeline.embed import run_embed as run

main = stage_main(run)

if __name__ == "__main__":
    main()
