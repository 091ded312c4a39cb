"""Stage 5: the comparison table: perplexity per run and code source, planner accuracy,
structure of planner-in-the-loop generations (`make evaluate`)."""
from planner_lm.cli import parse_config
from planner_lm.errors import friendly_errors
from planner_lm.evaluation.evaluate import EvaluateConfig, run_evaluate


def main(args: list[str] | None = None) -> None:
    with friendly_errors():
        cfg = parse_config(EvaluateConfig, "Evaluate every finished joint run on the test split (stage 5).", args)
        run_evaluate(cfg)


if __name__ == "__main__":
    main()
