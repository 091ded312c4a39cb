"""Hub-ready artefacts: a joint run saved, 'pushed' (to a local stand-in for the Hub) and loaded back,
and hostile repositories refused in one sentence before anything is built from them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fake_hub import FakeHub
from test_evaluate_stage import K, fake_joint_runs
from planner_lm.errors import UserError
from planner_lm.models.base_lm import load_base_lm, tiny_config
from planner_lm.models.conditioning import CONFIG_FILE, ActionConditionedLM
from planner_lm.models.planner import Planner
from planner_lm.publish import main, publish
from planner_lm.run_folder import stage_dir


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """HfApi's repository creation and upload, answered by copying into a local stand-in for the Hub
    whose downloads select files as huggingface_hub does (`fake_hub.FakeHub`). The fixture is that
    stand-in's repository folder: `hub / "owner/name"`; `hub.fetched` lists the repositories asked for."""
    import huggingface_hub

    fake = FakeHub(tmp_path).install(monkeypatch)

    class Remote(type(tmp_path)):
        fake: FakeHub

        @property
        def fetched(self) -> list[str]:
            return fake.asked

    remote = Remote(fake.remote)
    remote.fake = fake

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
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
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


# ---------------------------------------------------------------------------- hostile repositories
def tiny_base(where: Path) -> Path:
    """A few-thousand-parameter GPT-2 saved as a Hugging Face folder (safetensors)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("gpt2")).save_pretrained(where)
    return where


def push_lm(hub: Path, repo_id: str, base: Path, include_base: bool = True) -> Path:
    """A conditioned LM on `base` (K=4 actions of width 8) 'pushed' to the stand-in as `repo_id`."""
    lm = ActionConditionedLM(load_base_lm(str(base)), torch.randn(4, 8), conditioned_layers=[2, 3])
    return lm.save_pretrained(hub / repo_id, include_base=include_base)


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**config, **changes}))


def refused(load, capsys) -> str:
    """The one sentence a load is refused with (as `friendly_errors` would print it)."""
    with pytest.raises(UserError) as info:
        load()
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in capsys.readouterr().err
    return message


def test_a_hostile_conditioned_lm_is_refused_before_anything_is_built(tmp_path, hub, capsys):
    victim = tiny_base(tmp_path / "home" / "victim-lm")  # a model on this machine a download might point at
    folder = push_lm(hub, "evil/lm", victim)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle")
    (folder / "base" / "exploit.py").write_text("import os")
    assert isinstance(ActionConditionedLM.from_pretrained("evil/lm"), ActionConditionedLM)  # well-formed so far
    snapshot = hub.fake.snapshot("evil/lm")
    assert not list(snapshot.rglob("*.bin")) and not list(snapshot.rglob("*.py"))  # never fetched

    cases = {
        "outside": dict(base_saved=False, base_relative="../../../home/victim-lm", base=str(victim)),
        "local path": dict(base_saved=False, base_relative=None, base=str(victim)),
        "unknown key": dict(run_this="rm -rf ~"),
        "absurd size": dict(num_actions=10**12),
        "size unlike the weights": dict(num_actions=400),
        "bad type": dict(conditioned_layers="all"),
    }
    expected = {"outside": "outside the downloaded folder", "local path": "by a local path",
                "unknown key": "'run_this'", "absurd size": "'num_actions' must be an integer in",
                "size unlike the weights": "does not match its config", "bad type": "'conditioned_layers' must be"}
    for case, changes in cases.items():
        repo = f"evil/{case.replace(' ', '-')}"
        shutil.copytree(folder, hub / repo)
        edit_config(hub / repo, **changes)
        assert expected[case] in refused(lambda: ActionConditionedLM.from_pretrained(repo), capsys), case


def test_a_downloaded_base_is_fetched_safely_announced_and_checked(tmp_path, hub, capsys, monkeypatch):
    base = tiny_base(hub / "someone" / "base")
    (base / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle")
    push_lm(hub, "me/lm", base, include_base=False)
    edit_config(hub / "me" / "lm", base="someone/base", base_relative=None)
    capsys.readouterr()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    ActionConditionedLM.from_pretrained("me/lm")  # the base named by the downloaded config comes from the Hub
    assert hub.fetched == ["me/lm", "someone/base"]
    err = capsys.readouterr().err
    assert "base LM 'someone/base' (named as its base by conditioned LM 'me/lm@" in err
    assert not list(hub.fake.folder("someone/base").rglob("*.bin"))

    # a base whose only weights are a pickle is refused, not unpickled
    only_pickle = hub / "someone" / "pickled"
    shutil.copytree(base, only_pickle)
    (only_pickle / "model.safetensors").unlink()
    edit_config(hub / "me" / "lm", base="someone/pickled")
    message = refused(lambda: ActionConditionedLM.from_pretrained("me/lm"), capsys)
    assert "has no top-level *.safetensors" in message and "nothing was downloaded" in message  # seen in its listing
    assert not [path for path in hub.fake.transferred if path.startswith("someone/pickled/")]
    # a base config that asks for far more parameters than its weights hold
    huge = hub / "someone" / "huge"
    shutil.copytree(base, huge)
    config = json.loads((huge / "config.json").read_text())
    (huge / "config.json").write_text(json.dumps({**config, "vocab_size": 10**8}))
    edit_config(hub / "me" / "lm", base="someone/huge")
    assert "describes" in refused(lambda: ActionConditionedLM.from_pretrained("me/lm"), capsys)

    edit_config(hub / "me" / "lm", base="someone/not-cached")
    hub.fake.snapshot_download("me/lm")  # in the cache, with a base that is not
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: nothing new is fetched, and nothing is announced
    assert "HF_HUB_OFFLINE=1" in refused(lambda: ActionConditionedLM.from_pretrained("me/lm"), capsys)


def test_a_hostile_planner_config_is_refused(tmp_path, hub, capsys):
    Planner(embedding_dim=8, num_actions=4, ffn_dim=16).save_pretrained(hub / "evil" / "planner")
    for changes, says in [(dict(ffn_dim=10**9), "'ffn_dim' must be an integer in"),
                          (dict(num_layers=3), "does not match its config"),
                          (dict(pickle="cos\nsystem\n"), "'pickle'"),
                          (dict(num_heads=3), "not divisible")]:
        repo = f"evil/planner-{len(hub.fetched)}"
        shutil.copytree(hub / "evil" / "planner", hub / repo)
        config = json.loads((hub / repo / "config.json").read_text())
        (hub / repo / "config.json").write_text(json.dumps({**config, **changes}))
        assert says in refused(lambda: Planner.from_pretrained(repo), capsys), changes
        hub.fetched.append(repo)


def test_names_that_can_only_be_paths_never_reach_the_hub(tmp_path, hub, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    for name in ("./models/gpt2", "/no/such/model", "~/models/gpt2", "runs/demo/lm-typo", "models\\gpt2"):
        assert "not a local folder (no such directory" in refused(lambda: load_base_lm(name), capsys), name
        assert "not a local folder (no such directory" in refused(lambda: Planner.from_pretrained(name), capsys)
    assert hub.fetched == []
    # `owner/name` may be a Hub id: announced, then fetched; its failure is one sentence too
    assert "could not download base LM 'models/gpt2'" in refused(lambda: load_base_lm("models/gpt2"), capsys)
    assert hub.fetched == ["models/gpt2"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE=1" in refused(lambda: load_base_lm("models/gpt2"), capsys)
    assert "local_files_only" in refused(
        lambda: ActionConditionedLM.from_pretrained("me/elsewhere", local_files_only=True), capsys)


def test_publish_never_deletes_a_users_folder_and_replaces_only_its_own_earlier_publish(tmp_path, capsys):
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
    (out / "lm" / "README.md").write_text("edited")  # the user edits a file publish wrote: replaced with it
    publish(run, "fixed", output=out)
    assert sorted(p.name for p in out.iterdir()) == [".planner-lm", "lm", "planner"]
    assert (out / "lm" / "README.md").read_text() == first

    for added in (out / "lm" / "notes.txt", out / "notes.md"):  # a file the user added: refused, kept
        added.write_text("the user's notes")
        with pytest.raises(SystemExit) as exit_info:
            main([str(run), "--selection", "fixed", "--output", str(out)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("error:") == 1 and str(added) in err
        assert added.read_text() == "the user's notes" and (out / "lm" / "README.md").read_text() == first
        added.unlink()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
