"""The `embed` stage: encoder resolution, length-sorted plan, aligned vectors, resume after a kill."""
from __future__ import annotations

from pathlib import Path

import shutil

import numpy as np
import pytest
import torch

from fixtures_stages import load_stage
from planner_lm.artifacts import read_manifest
from planner_lm.ownership import mark
from planner_lm.data.embed_data import EmbedPlan, length_sorted_batches
from planner_lm.errors import UserError
from planner_lm.lit import embed as lit_embed
from planner_lm import encoder_runtimes, sentence_vectors
from planner_lm.run_folder import RunFolder
from planner_lm.sentence_vectors import resolve_encoder_path
from planner_lm.prepared import PreparedCorpus

RUNTIMES = [pytest.param(backend, marks=pytest.mark.skipif(
    not encoder_runtimes.runtime_available(backend), reason=f"extra [{backend}] not installed"))
    for backend in encoder_runtimes.RUNTIME_BACKENDS]


@pytest.fixture(autouse=True)
def export_cache(tmp_path_factory, monkeypatch):
    """ONNX exports of the tiny encoder go to a per-session folder, not the user's cache."""
    monkeypatch.setenv("PLANNER_LM_CACHE", str(tmp_path_factory.getbasetemp() / "planner_lm_cache"))

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
    manifest = run_stage(tiny_prepared, tiny_encoder_dir, "--trainer.precision", "32-true", "--model.backend", "torch")
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
    run_stage(tiny_prepared, tiny_encoder_dir, "--trainer.precision", "bf16-mixed", "--model.backend", "torch")
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
    mark(shard_dir.parent, "stage", stage="embed")  # an interrupted embed run's folder, as its start left it
    (shard_dir / "plan.json").write_text('{"batch_size": 999}')
    np.save(shard_dir / "shard_000000.npy", np.zeros((3, 32), np.float16))  # stale: must not be used
    manifest = run_stage(tiny_prepared, tiny_encoder_dir, "--trainer.precision", "32-true")
    # the default backend (auto) is resolved for this host and recorded as such
    assert (manifest["facts"]["backend"], manifest["facts"]["quantize"]) == sentence_vectors.resolve_embed_backend("auto")
    embeddings = np.load(tiny_prepared / "1_embed" / "embeddings.npy").astype(np.float32)
    assert np.abs(np.linalg.norm(embeddings, axis=1) - 1).max() < 2e-3  # no zero rows from the stale shard
    assert torch.isfinite(torch.from_numpy(embeddings)).all()


# ---------------------------------------------------------------- backends (torch / onnx / openvino)
@pytest.mark.parametrize("backend", RUNTIMES)
def test_runtime_backend_matches_torch(backend, tiny_prepared, tiny_encoder_dir):
    texts = PreparedCorpus(tiny_prepared / "0_prepare").sentence_texts()[:12]
    torch_model = sentence_vectors.load_encoder(str(tiny_encoder_dir), backend="torch")
    runtime = sentence_vectors.load_encoder(str(tiny_encoder_dir), backend=backend)
    assert isinstance(runtime, encoder_runtimes.RuntimeEncoder) and runtime.path.is_file()
    with torch.no_grad():
        expected = sentence_vectors.encode_batch(torch_model, texts, "cpu")
    got = sentence_vectors.encode_batch(runtime, texts, "cpu")
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got * expected).sum(1).min() >= 0.99
    again = sentence_vectors.load_encoder(str(tiny_encoder_dir), backend=backend)  # the cached export
    assert again.path == runtime.path and torch.equal(sentence_vectors.encode_batch(again, texts, "cpu"), got)


@pytest.mark.parametrize("backend", RUNTIMES)
def test_embed_stage_runs_each_backend_and_later_stages_encode_alike(backend, tiny_prepared, tiny_encoder_dir):
    manifest = run_stage(tiny_prepared, tiny_encoder_dir, "--model.backend", backend, "--trainer.precision", "32-true")
    out = tiny_prepared / "1_embed"
    assert manifest["facts"]["backend"] == backend and manifest["facts"]["quantize"] is False
    embeddings = np.load(out / "embeddings.npy").astype(np.float32)
    assert (embeddings * reference_vectors(tiny_prepared, tiny_encoder_dir)).sum(1).min() >= 0.99
    settings = RunFolder(tiny_prepared).encoder_settings()
    assert settings["backend"] == backend and settings["quantize"] is False
    texts = PreparedCorpus(tiny_prepared / "0_prepare").sentence_texts()[:8]
    again = sentence_vectors.load_sentence_encoder(settings)(texts).numpy()
    np.testing.assert_allclose(again, embeddings[:8], atol=2e-3)  # float16 storage


@pytest.mark.skipif(not encoder_runtimes.runtime_available("onnx"), reason="extra [onnx] not installed")
def test_int8_onnx_embeds_close_to_fp32_and_is_recorded(tiny_prepared, tiny_encoder_dir):
    manifest = run_stage(tiny_prepared, tiny_encoder_dir, "--model.backend", "onnx", "--model.quantize", "true")
    assert manifest["facts"]["quantize"] is True and "int8" in manifest["metrics"]["compute"]
    embeddings = np.load(tiny_prepared / "1_embed" / "embeddings.npy").astype(np.float32)
    assert (embeddings * reference_vectors(tiny_prepared, tiny_encoder_dir)).sum(1).mean() >= 0.95
    assert RunFolder(tiny_prepared).encoder_settings()["quantize"] is True


def test_missing_extra_or_bad_backend_is_one_clear_user_error(tiny_prepared, tiny_encoder_dir, monkeypatch):
    with pytest.raises(UserError, match="unknown embed backend"):
        run_stage(tiny_prepared, tiny_encoder_dir, "--model.backend", "tensorrt")
    with pytest.raises(UserError, match="backend onnx only"):
        sentence_vectors.resolve_embed_backend("openvino", quantize=True)
    monkeypatch.setattr(encoder_runtimes, "runtime_available", lambda backend: False)
    for backend in encoder_runtimes.RUNTIME_BACKENDS:
        with pytest.raises(UserError, match=rf"needs the package.*\[{backend}\]") as caught:
            run_stage(tiny_prepared, tiny_encoder_dir, "--model.backend", backend)
        assert "\n" not in str(caught.value)
    assert not (tiny_prepared / "1_embed" / "manifest.json").exists()


def test_auto_backend_follows_the_host(monkeypatch):
    import planner_lm.hardware as hardware

    resolve = sentence_vectors.resolve_embed_backend
    monkeypatch.setattr(hardware, "fast_precision", lambda: "bf16-mixed")  # native bf16: torch autocast
    assert resolve("auto", "cpu") == ("torch", False)
    monkeypatch.setattr(hardware, "fast_precision", lambda: "32-true")
    installed = [(b, q) for b, q in sentence_vectors.FASTEST_WITHOUT_NATIVE_BF16
                 if b == "torch" or encoder_runtimes.runtime_available(b)]
    assert resolve("auto", "cpu") == installed[0]
    assert resolve("auto", "cpu", quantize=False) == next((b, q) for b, q in installed if not q)
    if encoder_runtimes.runtime_available("onnx"):
        assert resolve("onnx", "cpu") == ("onnx", False)  # a named backend runs fp32 unless asked
    monkeypatch.setattr(encoder_runtimes, "runtime_available", lambda backend: False)
    assert resolve("auto", "cpu") == ("torch", False)  # no extra installed: plain torch


def test_fp32_runtime_settings_fall_back_to_torch_where_the_extra_is_missing(tiny_encoder_dir, monkeypatch, capsys):
    monkeypatch.setattr(encoder_runtimes, "runtime_available", lambda backend: False)
    settings = {"encoder": str(tiny_encoder_dir), "max_seq_length": None, "precision": "32-true",
                "backend": "onnx", "quantize": False}
    vectors = sentence_vectors.load_sentence_encoder(settings)(["a sentence.", "another one."])
    assert vectors.shape[0] == 2 and "encoding with torch" in capsys.readouterr().out
    with pytest.raises(UserError, match="needs the package"):
        sentence_vectors.load_sentence_encoder({**settings, "quantize": True})
