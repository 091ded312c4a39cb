"""Stage 5: the comparison table: perplexity per run and code source, planner accuracy,
structure of planner-in-the-loop generations (`make evaluate`)."""
from planner_lm.cli import parse_config, stage_main
from planner_lm.evaluation.evaluate import EvaluateConfig, run_evaluate


def run(args: list[str] | None = None):
    """Parse the command line (YAML configs + overrides) and run the stage."""
    return run_evaluate(parse_config(EvaluateConfig, "Evaluate every finished joint run on the test split (stage 5).", args))


main = stage_main(run)


if __name__ == "__main__":
    main()
