"""Hub-ready artefacts: a joint run saved, 'pushed' (to a local stand-in for the Hub) and loaded back."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from test_evaluate_stage import K, fake_joint_runs
from planner_lm.models.conditioning import ActionConditionedLM
from planner_lm.models.hub import SAFE_PATTERNS
from planner_lm.models.planner import Planner
from planner_lm.publish import main, publish
from planner_lm.run_folder import stage_dir


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """HfApi's repository creation and upload, answered by copying into a local folder."""
    import huggingface_hub

    remote = tmp_path / "remote"

    class Created:
        def __init__(self, repo_id: str) -> None:
            self.repo_id = repo_id

    def create_repo(self, repo_id, **kwargs):
        return Created(repo_id)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, remote / repo_id, dirs_exist_ok=True)
        return f"https://huggingface.co/{repo_id}/commit/local"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        assert allow_patterns == SAFE_PATTERNS  # nothing that could be unpickled is ever fetched
        return str(remote / repo_id)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return remote


def test_a_run_is_pushed_with_cards_and_loads_back_anywhere(tmp_path, hub):
    run = fake_joint_runs(tmp_path, ("soft",), num_docs=12)
    original = ActionConditionedLM.from_pretrained(stage_dir(run, "finetune_joint", "soft") / "lm").eval()

    out = publish(run, "soft", repo="me/planner-demo", output=tmp_path / "hub")
    assert sorted(p.name for p in hub.iterdir()) == ["me"]
    assert {p.name for p in (hub / "me").iterdir()} == {"planner-demo", "planner-demo-planner"}
    files = [p for p in hub.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".pt", ".bin", ".pkl", ".ckpt")]
    card = (hub / "me" / "planner-demo" / "README.md").read_text()
    assert "library_name: planner-lm" in card and f"k = {K} k-means centroids" in card
    assert "| selection | soft |" in card and 'from_pretrained(\'me/planner-demo\')' in card
    assert "Not evaluated yet" in card
    assert (out / "lm" / "README.md").read_text() == card

    # the base of this run is a local folder: the pushed LM carries it, so it loads without the run
    shutil.rmtree(run)
    lm = ActionConditionedLM.from_pretrained("me/planner-demo").eval()
    ids, weights = torch.randint(0, 90, (1, 6)), torch.softmax(torch.randn(1, 6, K), -1)
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids=ids, action_weights=weights).logits,
                                   original(input_ids=ids, action_weights=weights).logits)
    planner = Planner.from_pretrained("me/planner-demo-planner")
    assert planner.num_actions == K and planner.context_sentences == 3


def test_publish_command_line_saves_locally_and_refuses_bad_repo_names(tmp_path, capsys):
    run = fake_joint_runs(tmp_path, ("fixed",), num_docs=12)
    main([str(run), "--selection", "fixed"])
    hub_dir = stage_dir(run, "finetune_joint", "fixed") / "hub"
    assert (hub_dir / "lm" / "conditioning.safetensors").is_file()
    assert (hub_dir / "planner" / "config.json").is_file()  # the planner its generations use: the pretrained one
    with pytest.raises(SystemExit) as exit_info:
        main([str(run), "--selection", "fixed", "--repo", "no-owner"])
    assert exit_info.value.code == 2 and "user or org" in capsys.readouterr().err
    assert Path(hub_dir / "lm" / "tokenizer.json").is_file() or Path(hub_dir / "lm" / "vocab.json").is_file()


def test_publish_never_deletes_a_users_folder_and_replaces_its_own_output_whole(tmp_path, capsys):
    run = fake_joint_runs(tmp_path, ("fixed",), num_docs=12)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's notes")
    with pytest.raises(SystemExit) as exit_info:
        main([str(run), "--selection", "fixed", "--output", str(mine)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("error:") == 1 and str(mine) in err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no copy left behind

    out = tmp_path / "shared"
    publish(run, "fixed", output=out)
    first = (out / "lm" / "README.md").read_text()
    (out / "lm" / "stale.txt").write_text("left by the first publish")  # inside planner-lm's own output
    publish(run, "fixed", output=out)
    assert sorted(p.name for p in out.iterdir()) == [".planner-lm", "lm", "planner"]
    assert not (out / "lm" / "stale.txt").exists() and (out / "lm" / "README.md").read_text() == first
