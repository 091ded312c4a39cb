"""The `pretrain-planner` stage end to end on fabricated upstream stages with a planted rule."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_stages import load_stage, make_fake_upstream, record_training_steps
from planner_lm.artifacts import read_manifest, write_manifest
from planner_lm.data.planner_data import PlannerDataModule, action_baselines
from planner_lm.errors import UserError
from planner_lm.lit.planner import PlannerModule
from planner_lm.models.planner import Planner

ROOT = Path(__file__).resolve().parents[1]


pretrain_planner = load_stage("pretrain_planner")

K, DIM = 8, 16
FAST = ["--model.ffn_dim", "32", "--model.dropout", "0.0", "--model.lr", "1e-2", "--data.batch_size", "32",
        "--data.num_workers", "0", "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "5"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    return make_fake_upstream(tmp_path_factory.mktemp("upstream"), num_docs=60, sentences_per_doc=(2, 12), dim=DIM, k=K)


@pytest.fixture
def run_dir(upstream, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(upstream, target)
    return target


def stage_args(run_dir, *extra: str) -> list[str]:
    return ["--config", "configs/pretrain_planner.yaml", "--run_dir", str(run_dir), *FAST, *extra]


@pytest.fixture(autouse=True)
def repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def test_stage_learns_the_planted_rule_and_hands_off_planner_pt(run_dir) -> None:
    manifest = pretrain_planner.run(stage_args(run_dir, "--trainer.max_epochs", "8"))
    metrics, facts = manifest["metrics"], manifest["facts"]
    assert facts == {**facts, "num_actions": K, "embedding_dim": DIM, "context_sentences": 6}
    # far above chance (1/8) and above both content-free baselines it must beat
    assert metrics["val/top1"] > 0.6, metrics
    assert metrics["val/top1"] > metrics["val/baseline_majority_top1"] + 0.3
    assert metrics["val/top1"] > metrics["val/baseline_previous_top1"] + 0.3
    assert metrics["val/mean_rank"] < 2.0
    # the hand-off is the weights of the validation with the lowest NLL
    assert 0 < metrics["exported_step"] <= metrics["steps"]

    out = run_dir / "3_planner"
    assert read_manifest(out, "pretrain_planner").facts["num_actions"] == K
    assert any((out / "tb").rglob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "last.ckpt").is_file()
    planner = Planner.from_pretrained(out).eval()
    assert planner.num_actions == K and planner.context_sentences == 6
    assert set(planner.upstream) == {"prepare", "embed", "cluster"}
    # the hand-off predicts what the manifest says it does
    data = PlannerDataModule(str(run_dir), context_sentences=6, eval_batch_size=10_000)
    data.setup()
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        accuracy = (planner(batch["context"], batch["mask"]).argmax(-1) == batch["target"]).float().mean().item()
    assert accuracy == pytest.approx(metrics["val/top1"], abs=1e-4)


def test_unpredictable_actions_stay_unpredictable(tmp_path) -> None:
    """With independent actions nothing in the context predicts the next one: a planner well
    above chance would be reading the sentence it predicts."""
    run_dir = make_fake_upstream(tmp_path, num_docs=60, sentences_per_doc=(2, 12), dim=DIM, k=K, planted=False)
    metrics = pretrain_planner.run(stage_args(run_dir, "--trainer.max_epochs", "3"))["metrics"]
    assert metrics["val/top1"] < 1 / K + 0.2, metrics


def test_head_starts_as_the_codebook(run_dir) -> None:
    data = PlannerDataModule(str(run_dir), context_sentences=4)
    module = PlannerModule(data.embedding_dim, data.num_actions, data.centroids, context_sentences=4, ffn_dim=16)
    centroids = np.load(run_dir / "2_cluster" / "centroids.npy")
    assert torch.equal(module.planner.head.weight.detach(), torch.from_numpy(centroids))


def test_resume_after_a_crash_matches_an_uninterrupted_run(run_dir, tmp_path, monkeypatch) -> None:
    # ~300 training sentences / 32 = 10 batches per epoch; validation (and a checkpoint) every 4
    # compare the final weights (not the best validation's), which depend on every step
    args = ["--trainer.max_epochs", "2", "--trainer.val_check_interval", "4", "--model.export_best", "false"]
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    reference = pretrain_planner.run(stage_args(other, *args))
    steps = reference["metrics"]["steps"]

    crash_at = steps - 3

    def crash(self, batch, batch_idx):
        if self.global_step == crash_at:
            raise RuntimeError("simulated crash")

    with monkeypatch.context() as patch:
        patch.setattr(PlannerModule, "on_train_batch_start", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            pretrain_planner.run(stage_args(run_dir, *args))
    out = run_dir / "3_planner"
    assert not (out / "manifest.json").exists()
    saved_step = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < saved_step < crash_at

    steps_run = record_training_steps(monkeypatch, PlannerModule)
    resumed = pretrain_planner.run(stage_args(run_dir, *args))
    assert steps_run == list(range(saved_step, steps))  # from the checkpoint on, not from scratch
    assert resumed["metrics"]["steps"] == resumed["metrics"]["exported_step"] == steps
    a = Planner.from_pretrained(out).state_dict()
    b = Planner.from_pretrained(other / "3_planner").state_dict()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name
    assert resumed["metrics"]["val/top1"] == pytest.approx(reference["metrics"]["val/top1"], abs=1e-6)


def test_mismatched_k_is_one_clear_error(run_dir, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        pretrain_planner.main(stage_args(run_dir, "--data.expected_num_actions", "5"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "k=5" in err and f"k={K}" in err and "make cluster" in err
    assert not (run_dir / "3_planner" / "planner").exists()


def test_cluster_built_from_another_embedding_run_is_refused(run_dir) -> None:
    embed = run_dir / "1_embed"
    data = json.loads((embed / "manifest.json").read_text())
    write_manifest(embed, stage="embed", config={"rebuilt": True}, inputs={"prepare": run_dir / "0_prepare"},
                   outputs=["embeddings.npy"], facts=data["facts"])
    with pytest.raises(UserError, match="make cluster"):
        PlannerDataModule(str(run_dir))


def test_baselines_on_a_handmade_sequence() -> None:
    # two documents: 0 1 0 1 | 2 2 ; validation = the second document
    actions = np.array([0, 1, 0, 1, 2, 2])
    doc_first = np.array([0, 0, 0, 0, 4, 4])
    result = action_baselines(actions, np.arange(4), np.array([4, 5]), doc_first, num_actions=3)
    # majority on train is 0 (tie 0/1 broken by id): never right on [2, 2]
    assert result["majority_top1"] == 0.0
    # previous: document start -> majority (0, wrong), then 2 -> 2 (right)
    assert result["previous_top1"] == 0.5
    # bigram: start -> 0 (train docs start with 0), after 2 (unseen) -> majority 0
    assert result["bigram_top1"] == 0.0
    assert result["majority_top3"] == 1.0
