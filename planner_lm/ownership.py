"""What planner-lm may delete or replace, and the start of every stage folder.

Nothing is deleted that the project did not create: every folder it may later delete or replace
carries its marker (`.planner-lm`) or, for a finished stage, its own manifest; and inside such a
folder, nothing is deleted that the project did not write (a finished stage's manifest lists its
files, a publish's or task's marker its own), so a user's notes saved in `5_eval/` stop a deletion
that would take them. Single files the project writes alone (`compare --output`) carry a header
with their digest, so an edited copy is the user's. Stage start (`start_stage`), OVERWRITE,
`planner_lm.publish`, `make clean` (`planner_lm.clean`), the output paths of commands and the caches
go through here, and refuse anything else with one sentence naming it.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

from planner_lm.artifacts import MANIFEST, atomic_write_text, config_hash, list_files
from planner_lm.errors import UserError

MARKER = ".planner-lm"
"""A JSON file ({"kind": ...}) in every folder planner-lm creates and may later delete or replace:
stage folders ("stage", with the stage's name) and published copies ("publish"). A finished stage's
own manifest counts as its marker too. A folder without either is never deleted."""


def mark(folder: str | os.PathLike, kind: str, **info: Any) -> None:
    """Record that planner-lm created `folder` (so it may delete or replace it later).

    A folder planner-lm writes whole (a publish, a harness task) also records `files=`, so that a
    file added later is known to be the user's."""
    atomic_write_text(Path(folder) / MARKER, json.dumps({"kind": kind, **info}) + "\n")


def _json_file(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def marker_of(folder: str | os.PathLike) -> dict[str, Any]:
    """What planner-lm's marker in `folder` records (empty: none, or not readable)."""
    return _json_file(Path(folder) / MARKER) or {}


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


# ----------------------------------------------------------------------------- files inside our folders
_TEMPORARY = re.compile(r"\.(?P<base>.+)\.(removed-\d+|[a-z0-9_]{8}\.tmp)")
"""A hidden entry planner-lm makes beside `base`: an atomic write or private build (`.<base>.<8>.tmp`) or a
folder being deleted (`.<base>.removed-<pid>`)."""


def temporary_of(name: str) -> str | None:
    """The name `name` is a planner-lm temporary of (see `_TEMPORARY`), or None: then it is not one."""
    found = _TEMPORARY.fullmatch(name)
    return found["base"] if found else None


def written_files(folder: str | os.PathLike) -> list[str]:
    """What a stage wrote into `folder`, for its manifest: every file but the marker, the manifest
    and the user's files found there when it re-ran (recorded in the marker by `start_stage`)."""
    users = (_json_file(Path(folder) / MARKER) or {}).get("user_files", [])
    return [f for f in list_files(folder) if f not in (MARKER, MANIFEST)
            and not any(f == user or f.startswith(f"{user}/") for user in users)]


def foreign_files(folder: str | os.PathLike) -> list[Path]:
    """Files inside a folder planner-lm made (a stage, a publish, a harness task) that it did not write.

    A finished stage's manifest lists every file the stage wrote, a publish or task marker the files
    it holds; a sub-folder with its own marker (a publish in `hub/`) answers for itself. An
    unfinished stage (no manifest yet) may hold only its working folders and the names it writes
    (`run_folder.UNFINISHED_FILES`).
    """
    from planner_lm.run_folder import UNFINISHED_FILES, WORK_DIRS

    folder = Path(folder)
    marker, manifest = _json_file(folder / MARKER) or {}, _json_file(folder / MANIFEST) or {}
    own = [p for p in folder.iterdir() if p.is_dir() and not p.is_symlink() and (p / MARKER).is_file()]
    foreign = [path for sub in own for path in foreign_files(sub)]
    recorded = manifest.get("files") if "schema_version" in manifest else marker.get("files")
    if isinstance(recorded, list):
        known = {*recorded, MARKER, MANIFEST}
        foreign += [folder / f for f in list_files(folder) if f not in known
                    and not any(Path(f).parts[0] == sub.name for sub in own)]
        return sorted(foreign)
    stage = manifest.get("stage") or marker.get("stage")
    patterns = (MARKER, MANIFEST, *WORK_DIRS, *manifest.get("outputs", {}), *UNFINISHED_FILES.get(stage, ()))
    for entry in folder.iterdir():
        name = entry.name
        if entry in own or any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        base = temporary_of(name)
        if base is None or not any(fnmatch.fnmatchcase(base, p) for p in patterns):
            foreign.append(entry)
    return sorted(foreign)


def name_foreign(foreign: list[Path]) -> str:
    """The first few of `foreign`, for a one-line message."""
    return ", ".join(str(p) for p in foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")


# ----------------------------------------------------------------------------- files planner-lm writes alone
_HEADER = "<!-- written by planner-lm {what}; sha256 {digest} -->\n"
_HEADER_RE = re.compile(r"<!-- written by planner-lm (?P<what>[^;]+); sha256 (?P<digest>[0-9a-f]{16}) -->\n")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def owned_text(path: str | os.PathLike) -> bool:
    """Whether `path` is a text file `write_owned_text` wrote and nobody has edited since."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return False
    first, _, body = text.partition("\n")
    found = _HEADER_RE.fullmatch(first + "\n")
    return found is not None and found["digest"] == _digest(body)


def check_owned_text(path: str | os.PathLike) -> None:
    """Refuse, touching nothing, an output file that exists and is not an unedited `write_owned_text`."""
    path = Path(path)
    if path.is_dir() or (path.exists() or path.is_symlink()) and not owned_text(path):
        raise UserError(f"{path} already exists and was not written by planner-lm (or was edited since), so it "
                        "is left alone; name another file or move it away")


def write_owned_text(path: str | os.PathLike, text: str, what: str) -> None:
    """Write `text` to `path` under a header that marks it as ours (with its digest, so an edited copy
    is the user's); refuse (`check_owned_text`) any existing file planner-lm did not write so."""
    check_owned_text(path)
    atomic_write_text(Path(path), _HEADER.format(what=what, digest=_digest(text)) + text)


def check_owned_folder(folder: str | os.PathLike, kind: str, option: str, names: Collection[str] | None = None) -> None:
    """Refuse, before any work, to write into `folder` unless it is new, empty or ours (marked `kind`)
    and holds no file planner-lm did not write (with `names`: none at those top-level names, the
    only ones that will be replaced; the user's other files stay)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option} {folder} is a file; name a new or empty folder")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if not marked(folder, kind):
        raise UserError(f"{option} {folder} already holds files planner-lm did not write; name a new or empty "
                        "folder (nothing in it was touched)")
    theirs = [p for p in foreign_files(folder) if names is None or p.relative_to(folder).parts[0] in names]
    if theirs:
        raise UserError(f"{option} {folder} holds files planner-lm did not write where it would write "
                        f"({name_foreign(theirs)}); move them away (nothing was touched)")


def remove_owned(folder: str | os.PathLike, kind: str, stage: str | None = None) -> None:
    """Delete a folder planner-lm created (it carries `marked(kind, stage)`) and holding only its files;
    refuse any other, naming what is not ours.

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
    foreign = foreign_files(folder)
    if foreign:
        raise UserError(f"{folder} holds files planner-lm did not write ({name_foreign(foreign)}), so nothing "
                        "was deleted; move them away and try again")
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
    if action == "rerun":  # the user's files stay, and stay theirs: the marker names them
        users = [str(p.relative_to(stage_dir).as_posix()) for p in foreign_files(stage_dir)]
        mark(stage_dir, "stage", stage=stage, **({"user_files": users} if users else {}))
        (stage_dir / MANIFEST).unlink()
    elif action == "replace":
        remove_owned(stage_dir, "stage", stage)
    stage_dir.mkdir(parents=True, exist_ok=True)
    if not (stage_dir / MARKER).is_file():
        mark(stage_dir, "stage", stage=stage)
    return stage_dir
