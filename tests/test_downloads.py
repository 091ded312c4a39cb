"""Downloads fetch only what the user named or was told of, only top-level safe files, at a revision
that is resolved, recorded and reused; a local clone or cache snapshot of a Hub repository gets a
download's checks. The Hub is `fake_hub.FakeHub`, which selects files as huggingface_hub does."""
from __future__ import annotations

import json
import shutil
import sys

import torch
from huggingface_hub.utils import filter_repo_objects

from fake_hub import FakeHub
from test_publish import edit_config, hub, push_lm, refused, tiny_base  # noqa: F401 - hub is a fixture
from planner_lm.model_files import SAFE_PATTERNS, TOP_LEVEL_ONLY, _selected, pin
from planner_lm.models.base_lm import load_base_lm
from planner_lm.models.conditioning import ActionConditionedLM


def announced_then_fetched(fake: FakeHub, monkeypatch) -> None:
    """Every transfer also writes `<fetch owner/name>` to stderr, so the order of lines shows what came first."""
    download = fake.snapshot_download

    def traced(repo_id, **kwargs):
        if not kwargs.get("local_files_only"):
            print(f"<fetch {repo_id}>", file=sys.stderr)
        return download(repo_id, **kwargs)

    monkeypatch.setattr("huggingface_hub.snapshot_download", traced)


def new_weights(folder) -> None:
    """Publish other weights of the same architecture in a model folder (a new revision of its repository)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).save_pretrained(folder)


# ---------------------------------------------------------------------------- told first, or not fetched
def test_a_base_named_by_a_download_is_announced_with_why_after_the_folders_own_checks(hub, tmp_path, capsys,
                                                                                         monkeypatch):
    base = tiny_base(hub / "someone" / "base")
    push_lm(hub, "me/lm", base, include_base=False)
    edit_config(hub / "me" / "lm", base="someone/base", base_relative=None)
    announced_then_fetched(hub.fake, monkeypatch)
    capsys.readouterr()
    ActionConditionedLM.from_pretrained("me/lm")
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("base LM 'someone/base'"))
    lm_commit, base_commit = hub.fake.commit("me/lm"), hub.fake.commit("someone/base")
    assert f"named as its base by conditioned LM 'me/lm@{lm_commit}', which does not carry it" in line
    assert f"of revision {base_commit[:12]}" in line and "pass base=" in line
    assert err.index(line) < err.index("<fetch someone/base>")  # told before it is fetched

    # a second load finds everything cached: nothing is fetched, so nothing is announced
    ActionConditionedLM.from_pretrained("me/lm")
    assert "downloading" not in capsys.readouterr().err

    # weights that disagree with their config are refused before the base is even looked up, in a
    # download and in a local folder alike
    for repo, changes in [("me/odd-width", dict(action_dim=9)), ("me/odd-layers", dict(conditioned_layers=[1, 2, 3]))]:
        shutil.copytree(hub / "me" / "lm", hub / repo)
        edit_config(hub / repo, base="someone/other", **changes)
        asked = len(hub.fetched)
        assert "does not match its config" in refused(lambda: ActionConditionedLM.from_pretrained(repo), capsys)
        local = shutil.copytree(hub / repo, tmp_path / repo)
        assert "does not match its config" in refused(lambda: ActionConditionedLM.from_pretrained(local), capsys)
        assert hub.fetched[asked:] == [repo]
    # a conditioned LM carrying its base: a bad config stops the download before base/ is fetched
    push_lm(hub, "me/carried", base, include_base=True)
    edit_config(hub / "me" / "carried", num_actions=5)
    assert "does not match its config" in refused(lambda: ActionConditionedLM.from_pretrained("me/carried"), capsys)
    assert hub.fake.transferred and not [p for p in hub.fake.transferred if p.startswith("me/carried/base/")]


def test_the_base_of_a_download_honours_local_files_only_and_a_given_base(hub, capsys):
    base = tiny_base(hub / "someone" / "base")
    push_lm(hub, "me/lm", base, include_base=False)
    edit_config(hub / "me" / "lm", base="someone/base", base_relative=None)
    hub.fake.snapshot_download("me/lm")  # the conditioned LM is cached, its base is not
    message = refused(lambda: ActionConditionedLM.from_pretrained("me/lm", local_files_only=True), capsys)
    assert "base LM 'someone/base' is not a local folder, nor in the Hugging Face cache" in message
    assert "local_files_only" in message and not [p for p in hub.fake.transferred if p.startswith("someone/")]
    asked = len(hub.fetched)
    ActionConditionedLM.from_pretrained("me/lm", base=load_base_lm(str(base)), local_files_only=True)
    assert hub.fetched[asked:] == ["me/lm"]  # a base given is used; nothing else is asked of the Hub


# ---------------------------------------------------------------------------- top-level files only
def test_only_the_expected_top_level_files_are_fetched(hub, tmp_path, capsys):
    # huggingface_hub matches with fnmatch, whose * crosses '/': the patterns alone would fetch nested files
    listed = ["config.json", "model.safetensors", "sub/x.json", "a/b/c.safetensors", "run.py", "pytorch_model.bin"]
    assert "sub/x.json" in list(filter_repo_objects(listed, allow_patterns=SAFE_PATTERNS))
    assert list(filter_repo_objects(listed, allow_patterns=SAFE_PATTERNS, ignore_patterns=TOP_LEVEL_ONLY)) == [
        "config.json", "model.safetensors"]
    assert _selected(dict.fromkeys([*listed, "odd[1].json", "*.json"], 1), lambda path: "/" not in path) == [
        "config.json", "model.safetensors"]  # and a listed name is its own exact pattern

    base = tiny_base(hub / "someone" / "base")
    for nested in ("sub/extra.json", "sub/model.safetensors", "a/b/deep.json", "onnx/model.json"):
        (base / nested).parent.mkdir(parents=True, exist_ok=True)
        (base / nested).write_text("{}")
    (base / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle")
    capsys.readouterr()
    load_base_lm("someone/base")
    expected = sorted(f"someone/base/{p.name}" for p in base.iterdir() if p.suffix in (".json", ".safetensors"))
    assert sorted(hub.fake.transferred) == expected
    assert f"downloading {len(expected)} files" in capsys.readouterr().err  # what is announced is what is fetched

    # a conditioned LM fetches its carried base/ one level down, nothing deeper and no other folder
    push_lm(hub, "me/carried", base, include_base=True)
    for nested in ("base/sub/x.json", "elsewhere/y.json"):
        (hub / "me" / "carried" / nested).parent.mkdir(parents=True, exist_ok=True)
        (hub / "me" / "carried" / nested).write_text("{}")
    ActionConditionedLM.from_pretrained("me/carried")
    fetched = {p[len("me/carried/"):] for p in hub.fake.transferred if p.startswith("me/carried/")}
    assert "base/model.safetensors" in fetched and "conditioning.safetensors" in fetched
    assert not {p for p in fetched if p.count("/") > 1 or not p.startswith("base/") and "/" in p}

    # a sentence encoder fetches the module folders its modules.json names, one level down
    from planner_lm.sentence_vectors import resolve_encoder_path

    encoder = hub / "someone" / "encoder"
    shutil.copytree(base, encoder, ignore=shutil.ignore_patterns("sub", "a", "onnx", "*.bin"))
    (encoder / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type": "T"},
                                                      {"idx": 1, "name": "1", "path": "1_Pooling", "type": "P"}]))
    for nested in ("1_Pooling/config.json", "1_Pooling/deeper/x.json", "2_Dense/model.safetensors"):
        (encoder / nested).parent.mkdir(parents=True, exist_ok=True)
        (encoder / nested).write_text("{}")
    resolve_encoder_path("someone/encoder")
    fetched = {p[len("someone/encoder/"):] for p in hub.fake.transferred if p.startswith("someone/encoder/")}
    assert "1_Pooling/config.json" in fetched and "modules.json" in fetched
    assert not {p for p in fetched if "/" in p and p != "1_Pooling/config.json"}


# ---------------------------------------------------------------------------- resolved, recorded, reused
def test_the_revision_is_resolved_recorded_and_reused(hub, tmp_path, capsys):
    base = tiny_base(hub / "someone" / "base")
    first = hub.fake.commit("someone/base")
    assert pin("someone/base", "base LM") == f"someone/base@{first}" and not hub.fake.transferred  # nothing fetched
    assert pin(str(base), "base LM") == str(base) and pin("smollm2-135m", "base LM") == "smollm2-135m"

    model = load_base_lm("someone/base")
    assert model.name_or_path == f"someone/base@{first}"  # what a conditioned LM saved on it records
    saved = ActionConditionedLM(model, torch.randn(4, 8), conditioned_layers=[2, 3]).save_pretrained(tmp_path / "lm")
    assert json.loads((saved / "conditioning_config.json").read_text())["base"] == f"someone/base@{first}"

    new_weights(base)  # the owner pushes new weights: later loads still get the recorded commit
    assert hub.fake.commit("someone/base") != first
    shutil.rmtree(hub.fake.cache)  # nothing cached either: the recorded commit is fetched again
    asked = len(hub.fake.requests)
    ActionConditionedLM.from_pretrained(saved)  # its base's fingerprint is checked: the very same weights
    assert hub.fake.requests[asked:] == [("someone/base", first)]

    # an unpinned Hub name moves on with the repository; a pinned one never does
    assert pin("someone/base", "base LM") != f"someone/base@{first}"
    assert load_base_lm(f"someone/base@{first}").name_or_path == f"someone/base@{first}"


def test_a_joint_run_on_a_hub_base_records_its_commit_and_later_loads_get_those_weights(hub, tmp_path, capsys):
    from fixtures_stages import make_fake_upstream, write_fake_lm
    from test_joint import DIM, K, run_stage

    run = make_fake_upstream(tmp_path / "run", num_docs=30, sentences_per_doc=(1, 8), dim=DIM, k=K)
    write_fake_lm(run, out=hub / "someone" / "tiny")
    (hub / "someone" / "tiny" / "manifest.json").unlink()  # a Hub model, not a pretrain-lm stage
    commit = hub.fake.commit("someone/tiny")
    manifest = run_stage(run, "none", "--data.lm", "someone/tiny")
    assert manifest["facts"]["lm_name"] == f"someone/tiny@{commit}"
    saved = run / "4_joint-none" / "lm"
    assert json.loads((saved / "conditioning_config.json").read_text())["base"] == f"someone/tiny@{commit}"

    new_weights(hub / "someone" / "tiny")
    assert hub.fake.commit("someone/tiny") != commit
    asked = len(hub.fake.requests)
    ActionConditionedLM.from_pretrained(saved)  # as evaluate and publish load it: the recorded weights
    assert hub.fake.requests[asked:] == [("someone/tiny", commit)]


# ---------------------------------------------------------------------------- clones and cache snapshots
def test_a_clone_or_cache_snapshot_of_a_hub_repository_gets_a_downloads_checks(hub, tmp_path, capsys):
    victim = tiny_base(tmp_path / "home" / "victim-lm")
    hostile = push_lm(tmp_path, "hostile", victim)
    edit_config(hostile, base_saved=False, base_relative=None, base=str(victim))
    ActionConditionedLM.from_pretrained(hostile)  # a folder of this machine's own: trusted as it is

    clone = shutil.copytree(hostile, tmp_path / "clone")
    (clone / ".git").mkdir()
    assert "by a local path" in refused(lambda: ActionConditionedLM.from_pretrained(clone), capsys)
    snapshot = shutil.copytree(hostile, tmp_path / "cache" / "models--evil--lm" / "snapshots" / ("a" * 40))
    assert "by a local path" in refused(lambda: ActionConditionedLM.from_pretrained(snapshot), capsys)
    edit_config(snapshot, base_relative="../../../../home/victim-lm")
    assert "outside the downloaded folder" in refused(lambda: ActionConditionedLM.from_pretrained(snapshot), capsys)

    # a cloned base whose only weights are a pickle is refused, as a download's would be
    pickled = shutil.copytree(victim, tmp_path / "pickled-clone")
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle")
    (pickled / ".git").mkdir()
    assert "no config.json with safetensors weights" in refused(lambda: load_base_lm(str(pickled)), capsys)
    assert hub.fetched == []


def test_an_embed_stage_records_its_hub_encoders_commit(hub, tiny_encoder_dir):
    from planner_lm.lit.embed import SentenceEmbedder

    shutil.copytree(tiny_encoder_dir, hub / "someone" / "encoder")
    commit = hub.fake.commit("someone/encoder")
    assert SentenceEmbedder(encoder="someone/encoder", backend="torch").hparams.encoder == f"someone/encoder@{commit}"
    assert SentenceEmbedder(encoder=str(tiny_encoder_dir), backend="torch").hparams.encoder == str(tiny_encoder_dir)
