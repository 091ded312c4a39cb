"""Offline base LM (`make pretrain-lm`): a small GPT-2 trained from scratch on the train split.

The stage's body is `planner_lm.pipeline.pretrain_lm.run_pretrain_lm`; `--help` lists every option.
The same command, installed: `planner-lm pretrain-lm`.
"""
from planner_lm.commands import command
from planner_lm.pipeline.pretrain_lm import run_pretrain_lm as run

main = command("pretrain-lm")  # what `planner-lm pretrain-lm` runs

if __name__ == "__main__":
    main()
