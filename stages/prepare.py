"""Stage 0: corpus -> train/val/test documents with sentence spans (`make prepare`)."""
from planner_lm.cli import parse_config, stage_main
from planner_lm.prepared import PrepareConfig, run_prepare


def run(args: list[str] | None = None):
    """Parse the command line (YAML configs + overrides) and run the stage."""
    return run_prepare(parse_config(PrepareConfig, "Split a corpus into documents and sentences (stage 0).", args))


main = stage_main(run)


if __name__ == "__main__":
    main()
