"""The body of every stage as a library function (`run_<stage>`); `stages/*.py` only call them.

Each `run_*` parses the stage's command line (YAML configs plus overrides), reads its upstream
through `planner_lm.run_folder.RunFolder`, does the work and writes its directory, manifest last.
"""
