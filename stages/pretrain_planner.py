"""Stage 3: pretrain the planner on next-action prediction (`make pretrain-planner`).

The stage's body is `planner_lm.pipeline.pretrain_planner.run_pretrain_planner`; `--help` lists every option.
The same command, installed: `planner-lm pretrain-planner`.
"""
from planner_lm.commands import command
from planner_lm.pipeline.pretrain_planner import run_pretrain_planner as run

main = command("pretrain-planner")  # what `planner-lm pretrain-planner` runs

if __name__ == "__main__":
    main()
