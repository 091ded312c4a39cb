"""Stage 2: k-means over the sentence embeddings = the codebook of writing actions (`make cluster`).

The stage's body is `planner_lm.pipeline.cluster.run_cluster`; `--help` lists every option.
"""
from planner_lm.cli import stage_main
from planner_lm.pipeline.cluster import run_cluster as run

main = stage_main(run)

if __name__ == "__main__":
    main()
