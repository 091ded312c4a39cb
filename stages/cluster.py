"""Stage 2: k-means over the sentence embeddings = the codebook of writing actions (`make cluster`).

The stage's body is `planner_lm.pipeline.cluster.run_cluster`; `--help` lists every option.
The same command, installed: `planner-lm cluster`.
"""
from planner_lm.commands import command
from planner_lm.pipeline.cluster import run_cluster as run

main = command("cluster")  # what `planner-lm cluster` runs

if __name__ == "__main__":
    main()
