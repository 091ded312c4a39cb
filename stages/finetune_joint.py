"""Stage 4: planner + action-conditioned LM fine-tuned end to end (`make finetune-joint`, `make baselines`).

The stage's body is `planner_lm.pipeline.finetune_joint.run_finetune_joint`; `--help` lists every option.
The same command, installed: `planner-lm finetune-joint`.
"""
from planner_lm.commands import command
from planner_lm.pipeline.finetune_joint import run_finetune_joint as run

main = command("finetune-joint")  # what `planner-lm finetune-joint` runs

if __name__ == "__main__":
    main()
