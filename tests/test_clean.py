"""`make clean RUN=...` deletes a run folder only when everything in it is planner-lm's."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fixtures_stages import make_fake_upstream
from planner_lm.ownership import start_stage
from planner_lm.clean import clean_run
from planner_lm.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def make_clean(run: Path | str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "clean", f"RUN={run}", f"PY={sys.executable}"], cwd=ROOT,
                          capture_output=True, text=True)


@pytest.fixture
def run(tmp_path) -> Path:
    """A run folder as the stages leave it: finished stages, an interrupted one, a token cache, a variant."""
    run = make_fake_upstream(tmp_path, num_docs=6)
    start_stage(run / "4_joint-soft", stage="finetune_joint", config={})
    (run / "tokens" / "abc" / "fp" / "train").mkdir(parents=True)
    (run / "tokens" / "abc" / "fp" / "train" / "cache.json").write_text("{}")
    variant = run / "frozen"
    variant.mkdir()
    (variant / ".linked").write_text("")
    (variant / "0_prepare").symlink_to("../0_prepare")
    start_stage(variant / "4_joint-fixed", stage="finetune_joint", config={})
    return run


def test_make_clean_deletes_a_run_folder_of_planner_lm_files_only(run):
    done = make_clean(run)
    assert done.returncode == 0, done.stderr
    assert not run.exists()
    assert sorted(p.name for p in run.parent.iterdir()) == []  # nothing parked beside it


def test_make_clean_refuses_a_run_folder_holding_a_users_file_and_deletes_nothing(run):
    (run / "notes.txt").write_text("mine")
    done = make_clean(run)
    assert done.returncode == 2 and done.stderr.count("error:") == 1
    assert "notes.txt" in done.stderr and "nothing was deleted" in done.stderr
    assert (run / "notes.txt").read_text() == "mine" and (run / "0_prepare" / "manifest.json").is_file()


@pytest.mark.parametrize("where", ["stage", "cache", "variant"])
def test_a_users_file_anywhere_the_check_looks_stops_the_deletion(run, where):
    parent = {"stage": run / "lm", "cache": run / "tokens" / "abc", "variant": run / "frozen"}[where]
    parent.mkdir(exist_ok=True)
    (parent / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="did not make"):
        clean_run(run)
    assert (parent / "notes.txt").read_text() == "mine"


def test_the_checkout_and_folders_without_stages_are_not_run_folders(tmp_path):
    done = make_clean(".")
    assert done.returncode == 2 and "not a run folder" in done.stderr
    assert (ROOT / "Makefile").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="holds no planner-lm stage folder"):
        clean_run(empty)
    assert empty.is_dir()
    assert clean_run(tmp_path / "missing") is False


LINKED_DIRS = {"variant": ("mine", "VARIANT=mine"), "seed": ("seed-43", "SEEDS=1"), "precision": ("precision-other", "SEEDS=1")}


@pytest.mark.parametrize("kind", sorted(LINKED_DIRS))
def test_the_link_rules_never_replace_a_users_folder_at_a_link_path(run, kind):
    """Seeds, precisions and variants link their parent's stages: an existing link is refreshed, but a real
    folder of the user's at a link path stops the rule with a clear message and is left as it was."""
    folder, variable = LINKED_DIRS[kind]
    upstream = [f"-o{run}/{stage}/manifest.json" for stage in ("2_cluster", "3_planner", "lm")]  # never rebuilt
    users = run / folder / "1_embed"
    users.mkdir(parents=True)
    (users / "notes.txt").write_text("mine")
    (run / folder / "0_prepare").symlink_to("elsewhere")  # a link: planner-lm's to refresh
    link = ["make", "--no-print-directory", *upstream, f"{run}/{folder}/.linked", f"RUN={run}", variable, "STAMP=",
            f"PY={sys.executable}"]
    result = subprocess.run(link, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert f"{run}/{folder}/1_embed exists and is not a link" in result.stderr
    assert "Traceback" not in result.stderr
    assert (users / "notes.txt").read_text() == "mine" and not users.is_symlink()
    assert (run / folder / "0_prepare").resolve() == (run / "0_prepare").resolve()  # links before it refreshed
    assert not (run / folder / ".linked").exists()

    users.rename(run / "moved-away")
    subprocess.run(link, cwd=ROOT, check=True, capture_output=True)
    assert (run / folder / "1_embed").resolve() == (run / "1_embed").resolve()
