"""Sample text with the planner in the loop and print it with its plan (`make generate PROMPT=...`).

The stage's body is `planner_lm.pipeline.generate.run_generate`; `--help` lists every option.
"""
from planner_lm.cli import stage_main
from planner_lm.pipeline.generate import run_generate as run

main = stage_main(run)

if __name__ == "__main__":
    main()
