"""Stage 4: planner + action-conditioned LM fine-tuned end to end (`make finetune-joint`, `make baselines`).

The stage's body is `planner_lm.pipeline.finetune_joint.run_finetune_joint`; `--help` lists every option.
"""
from planner_lm.cli import stage_main
from planner_lm.pipeline.finetune_joint import run_finetune_joint as run

main = stage_main(run)

if __name__ == "__main__":
    main()
