"""What every bench shares: its JSON kept as it grows, and inputs checked before the long work.

    with bench_report("kmeans", args.json, cpu_flags=cpu_flags()) as report:
        require_stages(run_dir, ["embed"], option="--datasets demo", instead="--datasets planted")
        for name in names:
            report.setdefault("datasets", []).append(measure(name))
            report.save()   # bench/out/kmeans.json now holds every finished data set

The report is printed as one JSON object on stdout when the bench ends. `save()` rewrites the
file (`--json`, default `bench/out/<bench>.json`) atomically after each finished piece, so a
crash, an out-of-memory kill or Ctrl-C keeps what was measured; on an exception the report is
also printed, with `"error"` and `"complete": false`. A `UserError` (a missing input, a bad
option) is one line on stderr and exit status 2, as in the stages.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benches run from a checkout, installed or not
    sys.path.insert(0, str(ROOT))

from planner_lm.artifacts import atomic_write_text  # noqa: E402
from planner_lm.errors import EXIT_USER_ERROR, UserError  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "out"


class Report(dict):
    """A bench's JSON object; `save()` after each finished measurement."""

    def __init__(self, path: Path, fields: dict[str, Any]) -> None:
        super().__init__(fields)
        self.path = path
        self.saved = False

    def save(self) -> None:
        """Rewrite the JSON file with everything measured so far (atomically)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self, indent=2, default=str) + "\n")
        self.saved = True

    def emit(self) -> None:
        self.save()
        print(json.dumps(self, indent=2, default=str), flush=True)


def add_json_option(parser: Any, bench: str) -> None:
    """`--json PATH`: where the report is kept while the bench runs (default bench/out/<bench>.json)."""
    parser.add_argument("--json", default=str(OUT_DIR / f"{bench}.json"),
                        help="keep the JSON report here, rewritten after each finished measurement "
                             "(default: %(default)s)")


@contextlib.contextmanager
def bench_report(bench: str, path: str | os.PathLike | None = None, **fields: Any) -> Iterator[Report]:
    """The bench's report: printed at the end, kept in `path` as it grows, kept and printed on errors."""
    report = Report(Path(path) if path else OUT_DIR / f"{bench}.json", {"bench": bench, **fields})
    try:
        yield report
    except UserError as err:
        if report.saved:  # measurements came before the error: keep them
            report.update(error=str(err), complete=False)
            report.save()
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except (Exception, KeyboardInterrupt) as err:
        report.update(error=f"{type(err).__name__}: {err}".splitlines()[0][:500], complete=False)
        report.emit()
        print(f"{bench}: stopped by {type(err).__name__}; what was measured is in {report.path}", file=sys.stderr)
        raise
    report["complete"] = True
    report.emit()


def require_stages(run_dir: str | os.PathLike, stages: Sequence[str], option: str, instead: str | None = None) -> None:
    """Raise a one-line `UserError` unless `run_dir` holds these finished stages: checked before long work.

    `option` names the command-line value that asked for this run (e.g. `--datasets demo`);
    `instead` is a value that needs no run (e.g. `--datasets planted`).
    """
    from planner_lm.run_folder import RunFolder

    folder = RunFolder(run_dir)
    try:
        for stage in stages:
            folder.manifest(stage)
    except UserError as err:
        hint = f"; or pass {instead}" if instead else ""
        raise UserError(f"{option} needs a run with {', '.join(stages)} finished: {err}{hint}") from err
