"""`make clean RUN=...` deletes a run folder only when everything in it is planner-lm's."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures_stages import make_fake_upstream
from planner_lm.artifacts import write_manifest
from planner_lm.clean import clean_run
from planner_lm.harness import write_text_task
from planner_lm.ownership import foreign_files, mark, start_stage, write_owned_text
from planner_lm.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def make_clean(run: Path | str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "clean", f"RUN={run}", f"PY={sys.executable}"], cwd=ROOT,
                          capture_output=True, text=True)


@pytest.fixture
def run(tmp_path) -> Path:
    """A run folder as the stages and commands leave it: finished stages (one with TensorBoard events and
    checkpoints), an interrupted one, a token cache, a variant, `seeds.md` and `precisions.md`
    (`compare --output`), a harness task, a publish in a joint run and the project's hidden temporaries."""
    run = make_fake_upstream(tmp_path, num_docs=6)
    start_stage(run / "4_joint-soft", stage="finetune_joint", config={})
    (run / "4_joint-soft" / "checkpoints").mkdir()
    (run / "4_joint-soft" / "checkpoints" / "last.ckpt").write_text("ckpt")
    evaluate = start_stage(run / "5_eval", stage="evaluate", config={})
    (evaluate / "tb" / "version_0").mkdir(parents=True)
    (evaluate / "tb" / "version_0" / "events.out.tfevents.1").write_text("events")
    (evaluate / "results.md").write_text("| table |")
    write_manifest(evaluate, stage="evaluate", config={}, outputs=["results.md"])
    (run / "tokens" / "abc" / "fp" / "train").mkdir(parents=True)
    (run / "tokens" / "abc" / "fp" / "train" / "cache.json").write_text("{}")
    (run / "tokens" / "abc" / "fp" / "train" / "doc_offsets.npy").write_text("")
    variant = run / "frozen"
    variant.mkdir()
    (variant / ".linked").write_text("")
    (variant / "0_prepare").symlink_to("../0_prepare")
    start_stage(variant / "4_joint-fixed", stage="finetune_joint", config={})
    write_owned_text(run / "seeds.md", "| question | seed 42 |", "compare")
    write_owned_text(run / "precisions.md", "| question | fp32 |", "compare")
    write_text_task(["a document."], run / "harness")
    hub = run / "4_joint-soft" / "hub"
    (hub / "lm").mkdir(parents=True)
    (hub / "lm" / "config.json").write_text("{}")
    mark(hub, "publish", files=["lm/config.json"])
    trash = run / ".2_cluster.removed-123"  # a replaced stage whose deletion was interrupted
    shutil.copytree(run / "2_cluster", trash)
    (run / ".seeds.md.ab12cd34.tmp").write_text("half")  # an atomic write cut short
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


USERS_FILES = [
    "notes.md",  # beside the stages
    "5_eval/notes.md",  # inside a finished stage
    "0_prepare/train/notes.md",  # inside a finished stage's output folder
    "4_joint-soft/notes.md",  # inside an interrupted stage
    "4_joint-soft/checkpoints-old/step10.ckpt",  # a folder of the user's in an interrupted stage
    "4_joint-soft/hub/notes.md",  # inside a publish
    ".5_eval-old/results.md",  # a hidden folder named like a stage
    ".4_joint-soft.bak",  # a hidden file named like a stage
    "tokens/abc/notes.txt",  # in the token cache
    "tokens/abc/fp/train/notes.txt",  # in a finished cache folder
    "frozen/notes.txt",  # in a variant
    "frozen/4_joint-fixed/notes.md",  # in a variant's stage
    "harness/notes.md",  # in a harness task folder
    "seeds.md",  # the project's table, edited by the user (below)
]


@pytest.mark.parametrize("where", USERS_FILES)
def test_a_users_file_anywhere_in_a_run_stops_the_deletion_and_is_named(run, where):
    path = run / where
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(path.read_text() + "\nmine" if path.exists() else "mine")
    mine = path.read_text()
    with pytest.raises(UserError, match="did not make") as refused:
        clean_run(run)
    message = str(refused.value)
    named = [p for p in (path, *path.parents) if run in p.parents and (f"{p}," in message or f"{p})" in message)]
    assert named and "nothing was deleted" in str(refused.value)  # the file, or the folder of the user's holding it
    assert path.read_text() == mine and (run / "0_prepare" / "manifest.json").is_file()


def test_the_projects_own_outputs_are_recognised_and_deleted(run):
    """seeds.md, precisions.md, harness/, a publish, checkpoints, TensorBoard events, temporaries: all ours."""
    assert clean_run(run) is True
    assert not run.exists()


def test_a_real_stages_files_are_all_recorded_as_its_own(tmp_path, monkeypatch):
    """A Lightning stage run through its entry point (checkpoints, TensorBoard events, hparams, the
    planner folder) leaves nothing `make clean` would take for the user's."""
    from fixtures_stages import load_stage

    monkeypatch.chdir(ROOT)
    run = make_fake_upstream(tmp_path, num_docs=12, dim=16, k=8)
    load_stage("pretrain_planner").run(["--config", "configs/pretrain_planner.yaml", "--run_dir", str(run),
                                        "--model.ffn_dim", "16", "--data.batch_size", "16", "--data.num_workers",
                                        "0", "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false"])
    assert foreign_files(run / "3_planner") == []
    (run / "3_planner" / "notes.md").write_text("mine")
    assert foreign_files(run / "3_planner") == [run / "3_planner" / "notes.md"]


def test_overwrite_refuses_a_stage_folder_holding_a_users_file(run):
    """OVERWRITE=1 replaces a stage folder only when all of it is the stage's."""
    (run / "5_eval" / "notes.md").write_text("mine")
    with pytest.raises(UserError, match=r"5_eval/notes.md.*nothing was deleted"):
        start_stage(run / "5_eval", stage="evaluate", config={"other": 1}, overwrite=True)
    assert (run / "5_eval" / "notes.md").read_text() == "mine"
    (run / "5_eval" / "notes.md").unlink()
    start_stage(run / "5_eval", stage="evaluate", config={"other": 1}, overwrite=True)
    assert not (run / "5_eval" / "results.md").exists()


def test_a_stage_re_run_over_a_users_file_keeps_it_the_users(run):
    """The same config re-runs in place: the user's file stays, and its new manifest does not claim it."""
    (run / "5_eval" / "notes.md").write_text("mine")
    start_stage(run / "5_eval", stage="evaluate", config={})
    write_manifest(run / "5_eval", stage="evaluate", config={}, outputs=["results.md"])
    assert foreign_files(run / "5_eval") == [run / "5_eval" / "notes.md"]
    with pytest.raises(UserError, match="5_eval/notes.md"):
        clean_run(run)


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
