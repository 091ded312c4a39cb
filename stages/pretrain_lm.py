"""Offline base LM (`make pretrain-lm`): a small GPT-2 trained from scratch on the train split.

The stage's body is `planner_lm.pipeline.pretrain_lm.run_pretrain_lm`; `--help` lists every option.
"""
from planner_lm.cli import stage_main
from planner_lm.pipeline.pretrain_lm import run_pretrain_lm as run

main = stage_main(run)

if __name__ == "__main__":
    main()
