"""`python -m planner_lm <command> ...`: the same as the installed `planner-lm` command."""
from planner_lm.commands import main

if __name__ == "__main__":
    main()
