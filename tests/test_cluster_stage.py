"""The `cluster` stage end to end on fabricated upstream stages (real entry point, real files)."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fixtures_stages import load_stage, make_fake_upstream
from planner_lm.artifacts import read_manifest
from planner_lm.errors import UserError

def fake_run(tmp_path: Path, **kwargs) -> tuple[Path, np.ndarray]:
    """Fabricated 0_prepare + 1_embed, and the planted actions (its fake 2_cluster is removed)."""
    run_dir = make_fake_upstream(tmp_path, **kwargs)
    truth = np.load(run_dir / "2_cluster" / "actions.npy")
    shutil.rmtree(run_dir / "2_cluster")
    return run_dir, truth


def run_stage(run_dir: Path, *extra: str) -> dict:
    args = ["--run_dir", str(run_dir), "--model.num_clusters", "8", "--data.batch_size", "256",
            "--trainer.max_epochs", "30", "--trainer.enable_progress_bar", "false", *extra]
    return load_stage("cluster").run(args)


def test_cluster_stage_writes_codebook_actions_and_report(tmp_path):
    run_dir, truth = fake_run(tmp_path, num_docs=120, k=8, dim=32, noise=0.05)
    manifest = run_stage(run_dir)
    out = run_dir / "2_cluster"
    assert read_manifest(out, "cluster").facts["num_actions"] == 8
    centroids, actions = np.load(out / "centroids.npy"), np.load(out / "actions.npy")
    facts = manifest["facts"]
    assert centroids.shape == (8, 32) and centroids.dtype == np.float32
    assert actions.dtype == np.int32 and actions.shape == (facts["num_sentences"],)
    assert facts["embedding_dim"] == 32 and facts["fit_sentences"] < facts["num_sentences"]
    # recovers the planted actions on every split (train fitted, val/test only assigned)
    hits = sum(Counter(truth[actions == c].tolist()).most_common(1)[0][1] for c in np.unique(actions))
    assert hits == len(truth)
    metrics = manifest["metrics"]
    assert metrics["converged"] and metrics["iterations"] == len(metrics["inertia_curve"])
    assert metrics["cluster_sizes"]["dead"] == 0 and metrics["cluster_sizes"]["entropy_normalized"] > 0.9
    report = json.loads((out / "report" / "report.json").read_text())
    assert sum(report["sizes"]) == facts["fit_sentences"]
    for name in ("cluster_sizes.png", "inertia.png", "examples.txt"):
        assert (out / "report" / name).stat().st_size > 0
    assert "## action" in (out / "report" / "examples.txt").read_text()
    assert any((out / "tb").rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_two_processes_cluster_like_one(tmp_path):
    """The stage's entry point on 2 forked gloo processes: the same codebook and actions."""
    run_dir, _ = fake_run(tmp_path, num_docs=120, k=8, dim=32, noise=0.05)
    run_stage(run_dir, "--model.backend", "torch")
    single = {name: np.load(run_dir / "2_cluster" / name) for name in ("centroids.npy", "actions.npy")}
    shutil.rmtree(run_dir / "2_cluster")
    run_stage(run_dir, "--model.backend", "torch", "--trainer.devices", "2", "--trainer.strategy", "ddp_fork",
              "--trainer.accelerator", "cpu")
    np.testing.assert_allclose(np.load(run_dir / "2_cluster" / "centroids.npy"), single["centroids.npy"],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.load(run_dir / "2_cluster" / "actions.npy"), single["actions.npy"])


def test_fit_on_a_subsample_still_assigns_every_sentence(tmp_path):
    run_dir, _ = fake_run(tmp_path, num_docs=60, k=4, dim=8, noise=0.05)
    manifest = run_stage(run_dir, "--model.num_clusters", "4", "--data.fit_sample_size", "100")
    assert manifest["facts"]["fit_sentences"] == 100
    actions = np.load(run_dir / "2_cluster" / "actions.npy")
    assert len(actions) == manifest["facts"]["num_sentences"] and set(actions.tolist()) == {0, 1, 2, 3}


def test_bad_inputs_fail_before_heavy_work(tmp_path):
    run_dir, _ = fake_run(tmp_path, num_docs=20, k=4, dim=8)
    with pytest.raises(UserError, match="cannot make 100000 clusters"):
        run_stage(run_dir, "--model.num_clusters", "100000")
    embeddings_path = run_dir / "1_embed" / "embeddings.npy"
    embeddings = np.load(embeddings_path)
    embeddings[5, 2] = np.nan
    np.save(embeddings_path, embeddings)
    with pytest.raises(UserError, match="NaN"):
        run_stage(run_dir, "--model.num_clusters", "4")
    (run_dir / "1_embed" / "manifest.json").unlink()
    with pytest.raises(UserError, match="make embed"):
        run_stage(run_dir, "--model.num_clusters", "4")
