"""Stage 5: the comparison table: perplexity per run and code source, planner accuracy,
structure of planner-in-the-loop generations (`make evaluate`).

The stage's body is `planner_lm.pipeline.evaluate.run_evaluate`; `--help` lists every option.
"""
from planner_lm.cli import stage_main
from planner_lm.pipeline.evaluate import run_evaluate as run

main = stage_main(run)

if __name__ == "__main__":
    main()
