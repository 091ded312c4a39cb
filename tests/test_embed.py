"""The `embed` stage: encoder resolution, length-sorted plan, aligned vectors, resume after a kill."""
from __future__ import annotations

from pathlib import Path

import shutil

import numpy as np
import pytest
import torch

from fixtures_stages import load_stage
from planner_lm.artifacts import read_manifest
from planner_lm.data.embed_data import EmbedPlan, length_sorted_batches
from planner_lm.errors import UserError
from planner_lm.lit import embed as lit_embed
from planner_lm.sentence_vectors import resolve_encoder_path
from planner_lm.prepared import PreparedCorpus

def run_stage(run_dir: Path, encoder: Path, *extra: str) -> dict:
    args = ["--run_dir", str(run_dir), "--model.encoder", str(encoder), "--data.batch_size", "3",
            "--data.shard_batches", "2", "--trainer.enable_progress_bar", "false", *extra]
    return load_stage("embed").run(args)


def reference_vectors(run_dir: Path, encoder: Path) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    texts = PreparedCorpus(run_dir / "0_prepare").sentence_texts()
    return SentenceTransformer(str(encoder), device="cpu").encode(texts, batch_size=4, normalize_embeddings=True)


def test_length_sorted_plan_covers_every_sentence_once():
    lengths = np.array([5, 50, 7, 7, 90, 1, 33])
    batches = length_sorted_batches(lengths, 3)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(7))
    assert list(lengths[flat]) == sorted(lengths, reverse=True)
    plan = EmbedPlan(batches, shard_batches=2)
    assert plan.num_shards == 2 and plan.ids_of_shard(1).tolist() == batches[2].tolist()


def test_encoder_names_resolve_or_fail_clearly(tmp_path, tiny_encoder_dir, monkeypatch):
    assert Path(resolve_encoder_path("all-MiniLM-L6-v2"), "modules.json").is_file()  # bundled, offline
    assert resolve_encoder_path(str(tiny_encoder_dir)) == str(tiny_encoder_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        resolve_encoder_path("sentence-transformers/all-mpnet-base-v2")
    with pytest.raises(UserError, match="not a local folder"):
        resolve_encoder_path(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a sentence-transformers model folder"):
        resolve_encoder_path(str(tmp_path / "empty"))


def test_embed_stage_vectors_align_with_sentence_ids(tiny_prepared, tiny_encoder_dir):
    manifest = run_stage(tiny_prepared, tiny_encoder_dir, "--trainer.precision", "32-true")
    out = tiny_prepared / "1_embed"
    embeddings = np.load(out / "embeddings.npy")
    facts = read_manifest(out, "embed").facts
    assert embeddings.dtype == np.float16 and embeddings.shape == (facts["num_sentences"], 32)
    assert facts["embedding_dim"] == 32 and facts["encoder"] == str(tiny_encoder_dir)
    np.testing.assert_allclose(np.linalg.norm(embeddings.astype(np.float32), axis=1), 1.0, atol=2e-3)
    # row i is sentence i: equal to plain SentenceTransformer.encode in id order
    cosine = (embeddings.astype(np.float32) * reference_vectors(tiny_prepared, tiny_encoder_dir)).sum(1)
    assert cosine.min() > 0.999
    assert not (out / "shards").exists() and manifest["metrics"]["precision"] == "32-true"


@pytest.mark.slow
def test_two_processes_embed_every_sentence_once_like_one(tiny_prepared, tiny_encoder_dir, tmp_path):
    """DDP on gloo (2 forked CPU processes): each rank embeds its share of the shards; the
    consolidated file is the one-process file, row for row."""
    run_stage(tiny_prepared, tiny_encoder_dir, "--trainer.precision", "32-true", "--data.shard_batches", "1")
    single = np.load(tiny_prepared / "1_embed" / "embeddings.npy")
    shutil.rmtree(tiny_prepared / "1_embed")
    run_stage(tiny_prepared, tiny_encoder_dir, "--trainer.precision", "32-true", "--data.shard_batches", "1",
              "--trainer.devices", "2", "--trainer.strategy", "ddp_fork")
    np.testing.assert_allclose(np.load(tiny_prepared / "1_embed" / "embeddings.npy").astype(np.float32),
                               single.astype(np.float32), atol=2e-3)


def test_bf16_autocast_stays_close_to_fp32(tiny_prepared, tiny_encoder_dir):
    run_stage(tiny_prepared, tiny_encoder_dir, "--trainer.precision", "bf16-mixed")
    embeddings = np.load(tiny_prepared / "1_embed" / "embeddings.npy").astype(np.float32)
    assert read_manifest(tiny_prepared / "1_embed", "embed").metrics["precision"] == "bf16-mixed"
    cosine = (embeddings * reference_vectors(tiny_prepared, tiny_encoder_dir)).sum(1)
    assert cosine.min() > 0.99


def test_killed_embed_resumes_from_finished_shards(tmp_path, tiny_prepared, tiny_encoder_dir, monkeypatch):
    fresh_run = tmp_path / "fresh"
    fresh_run.mkdir()
    (fresh_run / "0_prepare").symlink_to(tiny_prepared / "0_prepare", target_is_directory=True)
    run_stage(fresh_run, tiny_encoder_dir)
    expected = np.load(fresh_run / "1_embed" / "embeddings.npy")

    original_write = lit_embed.ShardWriter.write_on_batch_end
    written: list[int] = []

    def write_then_die(self, trainer, pl_module, prediction, *args, **kwargs):
        original_write(self, trainer, pl_module, prediction, *args, **kwargs)
        if int(prediction["shard"]) not in self._pending:  # this batch completed its shard
            written.append(int(prediction["shard"]))
            if len(written) == 2:
                raise RuntimeError("killed")

    monkeypatch.setattr(lit_embed.ShardWriter, "write_on_batch_end", write_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        run_stage(tiny_prepared, tiny_encoder_dir)
    shard_dir = tiny_prepared / "1_embed" / "shards"
    assert len(list(shard_dir.glob("shard_*.npy"))) == 2 and not (tiny_prepared / "1_embed" / "manifest.json").exists()
    # a half-written shard left by the kill is a temporary file: it must be ignored
    (shard_dir / ".shard_000003.npy.abc.tmp").write_bytes(b"\x93NUMPY truncated")
    monkeypatch.setattr(lit_embed.ShardWriter, "write_on_batch_end", original_write)

    encoded: list[int] = []
    original_step = lit_embed.SentenceEmbedder.predict_step

    def counting_step(self, batch, *args, **kwargs):
        encoded.append(int(batch["batch"]))
        return original_step(self, batch, *args, **kwargs)

    monkeypatch.setattr(lit_embed.SentenceEmbedder, "predict_step", counting_step)
    run_stage(tiny_prepared, tiny_encoder_dir)
    resumed = np.load(tiny_prepared / "1_embed" / "embeddings.npy")
    assert min(encoded) >= 4  # shards 0 and 1 (batches 0-3) were not encoded again
    np.testing.assert_array_equal(resumed, expected)


def test_changed_batch_plan_discards_old_shards(tiny_prepared, tiny_encoder_dir):
    shard_dir = tiny_prepared / "1_embed" / "shards"
    shard_dir.mkdir(parents=True)
    (shard_dir / "plan.json").write_text('{"batch_size": 999}')
    np.save(shard_dir / "shard_000000.npy", np.zeros((3, 32), np.float16))  # stale: must not be used
    run_stage(tiny_prepared, tiny_encoder_dir, "--trainer.precision", "32-true")
    embeddings = np.load(tiny_prepared / "1_embed" / "embeddings.npy").astype(np.float32)
    assert np.abs(np.linalg.norm(embeddings, axis=1) - 1).max() < 2e-3  # no zero rows from the stale shard
    assert torch.isfinite(torch.from_numpy(embeddings)).all()
