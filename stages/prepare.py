"""Stage 0: corpus -> train/val/test documents with sentence spans (`make prepare`).

The stage's body is `planner_lm.pipeline.prepare.run_prepare`; `--help` lists every option.
"""
from planner_lm.cli import stage_main
from planner_lm.pipeline.prepare import run_prepare as run

main = stage_main(run)

if __name__ == "__main__":
    main()
