"""Stage 0: corpus -> train/val/test documents with sentence spans (`make prepare`)."""
from planner_lm.cli import parse_config
from planner_lm.errors import friendly_errors
from planner_lm.prepared import PrepareConfig, run_prepare


def main(args: list[str] | None = None) -> None:
    with friendly_errors():
        cfg = parse_config(PrepareConfig, "Split a corpus into documents and sentences (stage 0).", args)
        run_prepare(cfg)


if __name__ == "__main__":
    main()
