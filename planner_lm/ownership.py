"""What planner-lm may delete or replace, and the start of every stage folder.

Nothing is deleted that the project did not create: every folder it may later delete or replace
carries its marker (`.planner-lm`) or, for a finished stage, its own manifest. Stage start
(`start_stage`), OVERWRITE, `planner_lm.publish`, `make clean` (`planner_lm.clean`) and the caches
go through here, and refuse any other folder with one sentence naming it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from planner_lm.artifacts import MANIFEST, atomic_write_text, config_hash
from planner_lm.errors import UserError

MARKER = ".planner-lm"
"""A JSON file ({"kind": ...}) in every folder planner-lm creates and may later delete or replace:
stage folders ("stage", with the stage's name) and published copies ("publish"). A finished stage's
own manifest counts as its marker too. A folder without either is never deleted."""


def mark(folder: str | os.PathLike, kind: str, **info: Any) -> None:
    """Record that planner-lm created `folder` (so it may delete or replace it later)."""
    atomic_write_text(Path(folder) / MARKER, json.dumps({"kind": kind, **info}) + "\n")


def _json_file(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def marked(folder: str | os.PathLike, kind: str, stage: str | None = None) -> bool:
    """Whether `folder` carries planner-lm's marker of this kind (and stage), or, for a stage, its manifest."""
    folder = Path(folder)
    found = _json_file(folder / MARKER) or {}
    if found.get("kind") == kind and (stage is None or found.get("stage") == stage):
        return True
    if kind != "stage":
        return False
    manifest = _json_file(folder / MANIFEST) or {}
    return "schema_version" in manifest and manifest.get("stage") == (stage or manifest.get("stage"))


def remove_owned(folder: str | os.PathLike, kind: str, stage: str | None = None) -> None:
    """Delete a folder planner-lm created (it carries `marked(kind, stage)`); refuse any other.

    The folder is first renamed to a hidden sibling, so readers see it whole or gone, never half
    deleted. A symbolic link is removed as a link: what it points to is left alone.
    """
    folder = Path(folder)
    if folder.is_symlink():
        folder.unlink()
        return
    if not folder.exists():
        return
    if not marked(folder, kind, stage):
        raise UserError(f"{folder} was not created by planner-lm (it has no {MARKER} or {MANIFEST} of ours), "
                        "so it is left alone; move it away yourself or choose another folder")
    trash = folder.with_name(f".{folder.name}.removed-{os.getpid()}")
    os.replace(folder, trash)
    shutil.rmtree(trash)


def replace_folder(built: str | os.PathLike, final: str | os.PathLike, kind: str) -> None:
    """Put the finished folder `built` (a sibling of `final`) in place of `final`.

    `final` may be missing, empty, or a folder planner-lm made (marked `kind`); anything else is
    refused before `built` moves, so a user's folder is never replaced.
    """
    built, final = Path(built), Path(final)
    if final.is_dir() and not final.is_symlink() and not any(final.iterdir()):
        final.rmdir()
    if final.exists() or final.is_symlink():
        remove_owned(final, kind)
    os.replace(built, final)


def private_sibling(final: str | os.PathLike) -> Path:
    """A new hidden folder beside `final` to build it in, renamed into place when complete."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))


# ----------------------------------------------------------------------------- stage folders
def check_stage(stage_dir: str | os.PathLike, *, stage: str, config: Any, overwrite: bool = False) -> str:
    """What `start_stage` would do, without touching anything: "new", "resume", "rerun" or "replace".

    Raises a `UserError` when it must refuse: a finished run made with another config (without
    `overwrite`), or a folder planner-lm did not create (whatever `overwrite` says).
    """
    stage_dir = Path(stage_dir)
    if stage_dir.exists() and not stage_dir.is_dir():
        raise UserError(f"{stage_dir} exists and is not a folder; move it away or choose another RUN directory")
    if not stage_dir.exists() or not any(stage_dir.iterdir()):
        return "new"
    if not marked(stage_dir, "stage", stage):
        raise UserError(
            f"{stage_dir} holds files planner-lm did not write (no {MANIFEST} or {MARKER} of a '{stage}' run), "
            "so it is left alone; move them away or choose another RUN directory"
        )
    if not (stage_dir / MANIFEST).is_file():
        return "replace" if overwrite else "resume"  # an interrupted run: resumed unless replaced
    old = _json_file(stage_dir / MANIFEST) or {}
    if old.get("config_hash") == config_hash(config):
        return "rerun"
    if not overwrite:
        raise UserError(
            f"{stage_dir} already holds a finished '{stage}' run made with a different config; "
            f"pass --overwrite true (make: OVERWRITE=1) to replace it, or choose another RUN directory"
        )
    return "replace"


def start_stage(
    stage_dir: str | os.PathLike, *, stage: str, config: Any, overwrite: bool = False
) -> Path:
    """Prepare `stage_dir` before heavy work (call it on global rank 0 only).

    - new (missing or empty): created and marked as planner-lm's;
    - finished with the same config: the stale manifest is removed and the stage re-runs;
    - finished with a different config: refused unless `overwrite` (then the folder is replaced);
    - unfinished (marked, no manifest): kept, so the stage can resume from what it completed;
    - a folder planner-lm did not create: refused, nothing touched (`check_stage`).
    """
    stage_dir = Path(stage_dir)
    action = check_stage(stage_dir, stage=stage, config=config, overwrite=overwrite)
    if action == "rerun":
        (stage_dir / MANIFEST).unlink()
    elif action == "replace":
        remove_owned(stage_dir, "stage", stage)
    stage_dir.mkdir(parents=True, exist_ok=True)
    if not (stage_dir / MARKER).is_file():
        mark(stage_dir, "stage", stage=stage)
    return stage_dir
