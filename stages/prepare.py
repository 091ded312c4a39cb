"""Stage 0: corpus -> train/val/test documents with sentence spans (`make prepare`).

The stage's body is `planner_lm.pipeline.prepare.run_prepare`; `--help` lists every option.
The same command, installed: `planner-lm prepare`.
"""
from planner_lm.commands import command
from planner_lm.pipeline.prepare import run_prepare as run

main = command("prepare")  # what `planner-lm prepare` runs

if __name__ == "__main__":
    main()
