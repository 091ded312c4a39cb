"""Sample text with the planner in the loop and print it with its plan (`make generate PROMPT=...`)."""
from planner_lm.cli import parse_config, stage_main
from planner_lm.generation_stage import GenerateConfig, run_generate


def run(args: list[str] | None = None):
    """Parse the command line (YAML configs + overrides) and run the stage."""
    return run_generate(parse_config(GenerateConfig, "Generate text that follows (and can be steered by) a plan.", args))


main = stage_main(run)


if __name__ == "__main__":
    main()
