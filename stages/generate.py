"""Sample text with the planner in the loop and print it with its plan (`make generate PROMPT=...`)."""
from planner_lm.cli import parse_config
from planner_lm.errors import friendly_errors
from planner_lm.generation_stage import GenerateConfig, run_generate


def main(args: list[str] | None = None) -> None:
    with friendly_errors():
        cfg = parse_config(GenerateConfig, "Generate text that follows (and can be steered by) a plan.", args)
        run_generate(cfg)


if __name__ == "__main__":
    main()
