"""Stage 3: pretrain the planner on next-action prediction (`make pretrain-planner`).

The stage's body is `planner_lm.pipeline.pretrain_planner.run_pretrain_planner`; `--help` lists every option.
"""
from planner_lm.cli import stage_main
from planner_lm.pipeline.pretrain_planner import run_pretrain_planner as run

main = stage_main(run)

if __name__ == "__main__":
    main()
