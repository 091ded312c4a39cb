import json

import numpy as np
import pytest

from planner_lm.artifacts import atomic_save_npy, manifest_hash, read_manifest, write_manifest
from planner_lm.ownership import MARKER, mark, marked, private_sibling, remove_owned, replace_folder, start_stage
from planner_lm.errors import UserError


def _finish(stage_dir, config, facts=None):
    atomic_save_npy(stage_dir / "x.npy", np.arange(6, dtype=np.int32).reshape(2, 3))
    return write_manifest(stage_dir, stage="cluster", config=config, outputs=["x.npy"], facts=facts or {"num_actions": 4})


def test_manifest_records_outputs_and_round_trips(tmp_path):
    out = start_stage(tmp_path / "2_cluster", stage="cluster", config={"k": 4})
    _finish(out, {"k": 4})
    manifest = read_manifest(out, "cluster")
    assert manifest.outputs["x.npy"]["shape"] == [2, 3]
    assert manifest.facts["num_actions"] == 4
    assert "torch" in manifest.data["versions"]
    manifest.require("num_actions", 4)
    with pytest.raises(UserError, match="num_actions=4 but 8 was expected"):
        manifest.require("num_actions", 8)


def test_manifest_is_written_last_and_atomically(tmp_path):
    out = tmp_path / "2_cluster"
    out.mkdir()
    with pytest.raises(FileNotFoundError):
        write_manifest(out, stage="cluster", config={}, outputs=["missing.npy"])
    assert not (out / "manifest.json").exists()
    assert list(out.iterdir()) == []  # no temp file left behind


def test_incomplete_or_foreign_stage_is_refused_with_the_target_to_run(tmp_path):
    with pytest.raises(UserError, match="run `make cluster`"):
        read_manifest(tmp_path / "2_cluster", "cluster")
    out = tmp_path / "2_cluster"
    out.mkdir()
    with pytest.raises(UserError, match="did not finish"):
        read_manifest(out, "cluster")
    _finish(out, {"k": 4})
    with pytest.raises(UserError, match="holds stage 'cluster', not 'embed'"):
        read_manifest(out, "embed")
    (out / "x.npy").unlink()
    with pytest.raises(UserError, match="incomplete: x.npy is missing"):
        read_manifest(out, "cluster")


def test_an_array_changed_after_its_stage_finished_is_refused(tmp_path):
    out = tmp_path / "2_cluster"
    out.mkdir()
    _finish(out, {"k": 4})
    read_manifest(out, "cluster")
    np.save(out / "x.npy", np.zeros((3, 2), dtype=np.float32))  # e.g. a later partial copy
    with pytest.raises(UserError, match="changed after the stage finished; re-run `make cluster`"):
        read_manifest(out, "cluster")


def test_old_schema_is_refused(tmp_path):
    out = tmp_path / "2_cluster"
    out.mkdir()
    _finish(out, {})
    data = json.loads((out / "manifest.json").read_text())
    data["schema_version"] = 0
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="schema version 0"):
        read_manifest(out, "cluster")


def test_rerun_with_other_config_refuses_unless_overwrite(tmp_path):
    out = start_stage(tmp_path / "s", stage="cluster", config={"k": 4})
    _finish(out, {"k": 4})
    with pytest.raises(UserError, match="different config"):
        start_stage(out, stage="cluster", config={"k": 8})
    assert (out / "manifest.json").exists()  # the refused call touched nothing
    start_stage(out, stage="cluster", config={"k": 8}, overwrite=True)
    assert not (out / "x.npy").exists()


def test_unfinished_stage_keeps_partial_work_for_resume(tmp_path):
    out = start_stage(tmp_path / "s", stage="cluster", config={"k": 4})
    (out / "shard-0.npy").write_bytes(b"partial")
    start_stage(out, stage="cluster", config={"k": 4})
    assert (out / "shard-0.npy").exists()


def test_hash_changes_when_upstream_is_rebuilt(tmp_path):
    up = tmp_path / "up"
    up.mkdir()
    _finish(up, {"k": 4}, facts={"num_actions": 4})
    first = manifest_hash(up)
    down = tmp_path / "down"
    down.mkdir()
    atomic_save_npy(down / "x.npy", np.zeros(1))
    write_manifest(down, stage="pretrain_planner", config={}, inputs={"cluster": up}, outputs=["x.npy"])
    downstream = read_manifest(down, "pretrain_planner")
    downstream.check_built_from("cluster", read_manifest(up, "cluster"))
    _finish(up, {"k": 4}, facts={"num_actions": 5})
    assert manifest_hash(up) != first
    with pytest.raises(UserError, match="built from an older"):
        downstream.check_built_from("cluster", read_manifest(up, "cluster"))


def test_atomic_outputs_are_ordinary_files_not_private_temp_files(tmp_path):
    import os
    import stat

    atomic_save_npy(tmp_path / "a.npy", np.zeros(2))
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.npy").stat().st_mode) == 0o666 & ~mask


# ----------------------------------------------------------------------------- what may be deleted
def test_overwrite_replaces_only_the_stage_folder_and_marks_the_new_one(tmp_path):
    run = tmp_path / "run"
    out = start_stage(run / "2_cluster", stage="cluster", config={"k": 4})
    _finish(out, {"k": 4})
    (run / "notes.txt").write_text("mine")
    start_stage(out, stage="cluster", config={"k": 8}, overwrite=True)
    assert (run / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in run.iterdir()) == ["2_cluster", "notes.txt"]  # nothing parked beside
    assert [p.name for p in out.iterdir()] == [MARKER]


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_stage_folder_planner_lm_did_not_create_is_never_touched(tmp_path, overwrite):
    folder = tmp_path / "lm"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=f"{folder} holds files planner-lm did not write"):
        start_stage(folder, stage="pretrain_lm", config={}, overwrite=overwrite)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    (folder / "manifest.json").write_text('{"stage": "embed", "schema_version": 1}')  # another stage's
    with pytest.raises(UserError, match="did not write"):
        start_stage(folder, stage="pretrain_lm", config={}, overwrite=overwrite)
    with pytest.raises(UserError, match="not created by planner-lm"):
        remove_owned(folder, "stage", "pretrain_lm")
    assert (folder / "notes.txt").read_text() == "mine"


def test_an_empty_folder_is_adopted_and_marked(tmp_path):
    folder = tmp_path / "3_planner"
    folder.mkdir()
    start_stage(folder, stage="pretrain_planner", config={})
    assert marked(folder, "stage", "pretrain_planner") and not marked(folder, "stage", "cluster")


def test_replace_folder_swaps_in_a_built_copy_only_over_an_owned_or_empty_folder(tmp_path):
    final = tmp_path / "out"
    for content in ("one", "two"):
        built = private_sibling(final)
        (built / "card.md").write_text(content)
        mark(built, "publish", files=["card.md"])  # what it holds: nothing else is ours
        replace_folder(built, final, "publish")
        assert (final / "card.md").read_text() == content
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    built = private_sibling(user)
    with pytest.raises(UserError, match=f"{user} was not created by planner-lm"):
        replace_folder(built, user, "publish")
    assert [p.name for p in user.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [built.name, "out", "user"]  # the new copy is kept aside


def test_caches_never_delete_a_folder_they_did_not_build(tmp_path):
    """The token cache and the embed stage's shards replace or clean only their own files."""
    from planner_lm.data.embed_data import remove_shards, reset_shards_if_plan_changed
    from planner_lm.data.lm_windows import _publish

    final = tmp_path / "tokens" / "fp" / "test"
    final.mkdir(parents=True)
    (final / "notes.txt").write_text("mine")
    built = tmp_path / "tokens" / "fp" / ".test.build"
    built.mkdir()
    (built / "cache.json").write_text("{}")
    with pytest.raises(UserError, match=f"{final} holds files that are not a planner-lm token cache"):
        _publish(built, final)
    assert [p.name for p in final.iterdir()] == ["notes.txt"] and not built.exists()

    shards = tmp_path / "1_embed" / "shards"
    assert not reset_shards_if_plan_changed(shards, {"plan": 1})
    atomic_save_npy(shards / "shard_000000.npy", np.zeros(2))
    assert reset_shards_if_plan_changed(shards, {"plan": 1})  # same plan: kept for resuming
    (shards / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="did not write"):
        reset_shards_if_plan_changed(shards, {"plan": 2})
    with pytest.raises(UserError, match="did not write"):
        remove_shards(shards)
    assert (shards / "notes.txt").read_text() == "mine" and (shards / "shard_000000.npy").is_file()
    (shards / "notes.txt").unlink()
    assert not reset_shards_if_plan_changed(shards, {"plan": 2})  # another plan: its own files go
    assert sorted(p.name for p in shards.iterdir()) == ["plan.json"]
