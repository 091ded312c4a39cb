"""`make clean RUN=...` (`python -m planner_lm.clean RUN`): delete a run folder, only if it is one.

A run folder is deleted only when everything in it is planner-lm's: stage folders carrying the
project's marker or manifest and holding only the files their stage wrote, the token cache,
variant folders (`make variant`, seeds, precisions: themselves run folders), the tables and tasks
commands write there (`seeds.md`, `precisions.md` by `compare --output`, `harness/` by
`planner-lm-eval task`), and the links and hidden temporaries the project makes. Anything else
(`RUN=.`, a home folder, a user's notes beside the stages or inside one, a hidden folder named
like a stage) is refused with one sentence that names it, and nothing is deleted.
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from planner_lm.ownership import MARKER, foreign_files, marked, name_foreign, owned_text, temporary_of
from planner_lm.errors import UserError, friendly_errors
from planner_lm.run_folder import JOINT_PREFIX, STAGE_DIRS, TOKEN_CACHE_DIR

VARIANT_MARKER = ".linked"  # written by `make variant` into RUN/<variant>
_STAGE_PATTERNS = (*STAGE_DIRS.values(), f"{JOINT_PREFIX}*", f"{STAGE_DIRS['evaluate']}-*")
_CACHE_FILE = "cache.json"  # a finished token cache folder (planner_lm.data.lm_windows)


def _is_stage_name(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in _STAGE_PATTERNS)


def _foreign_in_token_cache(cache: Path) -> list[Path]:
    """Files of the token cache that no cache build wrote (finished caches, hidden build folders)."""
    foreign = []
    for path in cache.rglob("*"):
        relative = path.relative_to(cache)
        in_cache = (path.parent / _CACHE_FILE).is_file() and (path.name == _CACHE_FILE or path.suffix == ".npy")
        if path.is_file() and not in_cache and not any(part.startswith(".") for part in relative.parts):
            foreign.append(path)
    return foreign


def _ours_at_root(entry: Path) -> list[Path] | None:
    """What planner-lm did not write in `entry`, one entry of a run folder; None: `entry` is not ours."""
    name = entry.name
    if name in (MARKER, VARIANT_MARKER) and entry.is_file():
        return []
    base = temporary_of(name)  # `.<stage>.removed-<pid>`, `.<stage>.<random>.tmp`, `.seeds.md.<random>.tmp`
    if base is not None and (_is_stage_name(base) or base == TOKEN_CACHE_DIR or (entry.is_file() and base.endswith(".md"))):
        return foreign_files(entry) if entry.is_dir() and marked(entry, "stage") else []
    if name.startswith("."):
        return None
    if entry.is_symlink():  # a variant's link to its parent's stage: removing it removes the link only
        return [] if _is_stage_name(name) or name == TOKEN_CACHE_DIR else None
    if entry.is_dir() and _is_stage_name(name) and marked(entry, "stage"):
        return foreign_files(entry)
    if entry.is_dir() and name == TOKEN_CACHE_DIR:
        return _foreign_in_token_cache(entry)
    if entry.is_dir() and (entry / VARIANT_MARKER).is_file():
        return foreign_entries(entry)
    if entry.is_dir() and (marked(entry, "harness") or marked(entry, "publish")):
        return foreign_files(entry)
    return [] if entry.is_file() and owned_text(entry) else None


def foreign_entries(run: Path) -> list[Path]:
    """What in `run` planner-lm did not make (empty: the whole folder is the project's)."""
    foreign = []
    for entry in sorted(run.iterdir()):
        found = _ours_at_root(entry)
        foreign.extend([entry] if found is None else found)
    return foreign


def clean_run(run_dir: str | os.PathLike) -> bool:
    """Delete the run folder `run_dir` if it is one (see module doc); False when there was none."""
    run = Path(run_dir)
    if not run.exists() and not run.is_symlink():
        return False
    if run.is_symlink() or not run.is_dir():
        raise UserError(f"{run} is not a planner-lm run folder (it is a link or a file); delete it yourself if you must")
    resolved = run.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents or resolved == Path.home().resolve():
        raise UserError(f"{run} is the current folder, one above it or the home folder, not a run folder; "
                        "name the run folder itself, e.g. RUN=runs/demo")
    foreign = foreign_entries(run)
    if foreign:
        raise UserError(f"{run} holds files planner-lm did not make ({name_foreign(foreign)}), so nothing was deleted; "
                        "move them away or delete the folder yourself")
    stages = [entry for entry in run.iterdir() if entry.is_dir() and not entry.is_symlink() and marked(entry, "stage")]
    if not stages and not (run / VARIANT_MARKER).is_file():
        raise UserError(f"{run} holds no planner-lm stage folder, so it is not a run folder; nothing was deleted")
    trash = run.with_name(f".{run.name}.removed-{os.getpid()}")
    os.replace(run, trash)  # gone at once for readers; then deleted
    shutil.rmtree(trash)
    return True


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m planner_lm.clean", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the run folder to delete, e.g. runs/demo")
    args = parser.parse_args(argv)
    with friendly_errors():
        print(f"deleted {args.run_dir}" if clean_run(args.run_dir) else f"{args.run_dir} does not exist; nothing to clean")


if __name__ == "__main__":
    main()
