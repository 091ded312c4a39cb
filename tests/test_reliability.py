"""Reliability across stages: crash-safe checkpoints, NaN stops, determinism, odd inputs, offline.

Each test runs a real stage entry point on tiny data. The whole chain killed with SIGKILL at
random points is in `test_crash_resume.py` (slow).
"""
from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from conftest import NetworkBlocked
from fixtures_stages import load_stage, make_fake_upstream, record_training_steps
from planner_lm.lit.lm_pretrain import CausalLMPretrainModule
from planner_lm.lit.planner import PlannerModule
from planner_lm.models.planner import Planner

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread_in_repo(monkeypatch):
    """Configs are read relative to the repository; tiny models run fastest on one thread."""
    monkeypatch.chdir(ROOT)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    return make_fake_upstream(tmp_path_factory.mktemp("upstream"), num_docs=60, sentences_per_doc=(2, 12), dim=16, k=8)


def copy_run(upstream: Path, target: Path) -> Path:
    shutil.copytree(upstream, target)
    return target


PLANNER_ARGS = ["--config", "configs/pretrain_planner.yaml", "--model.ffn_dim", "32", "--model.lr", "1e-2",
                "--data.batch_size", "32", "--data.num_workers", "0", "--trainer.enable_progress_bar", "false",
                "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "5"]


def planner_run(run_dir: Path, *extra: str) -> dict:
    return load_stage("pretrain_planner").run(["--run_dir", str(run_dir), *PLANNER_ARGS, *extra])


def planner_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return Planner.from_pretrained(run_dir / "3_planner").state_dict()


# ---------------------------------------------------------------------------- crash safety
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(upstream, tmp_path, monkeypatch, capsys):
    run_dir = copy_run(upstream, tmp_path / "run")
    real_step = PlannerModule.training_step

    def poisoned(self, batch, batch_idx):
        loss = real_step(self, batch, batch_idx)
        return loss * float("nan") if self.global_step == 6 else loss  # the 7th optimizer step

    monkeypatch.setattr(PlannerModule, "training_step", poisoned)
    with pytest.raises(SystemExit) as exit_info:
        load_stage("pretrain_planner").main(["--run_dir", str(run_dir), *PLANNER_ARGS, "--checkpoint_every_n_steps", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "nan at step 7" in err and "step 6" in err and "Traceback" not in err
    out = run_dir / "3_planner"
    assert not (out / "manifest.json").exists()
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 6
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())


def test_lm_resumes_mid_epoch_from_a_step_checkpoint_to_the_same_weights(tiny_prepared, tmp_path, monkeypatch):
    """Dropout on, a shuffled loader, a crash between two step checkpoints: same final weights.

    With max_epochs set, the LR schedule needs the number of batches per epoch; asking for it too
    early once made resumed runs start their epoch over (they trained on other batches).
    """
    from safetensors.torch import load_file

    args = ["--model.n_layer", "1", "--model.n_embd", "32", "--model.n_head", "2", "--model.n_positions", "64",
            "--model.dropout", "0.2", "--model.warmup_steps", "2", "--data.window", "16", "--data.batch_size", "2",
            "--trainer.max_steps", "16", "--trainer.max_epochs", "3", "--trainer.check_val_every_n_epoch", "100", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--checkpoint_every_n_steps", "4"]
    reference_dir = tmp_path / "reference"
    shutil.copytree(tiny_prepared, reference_dir)
    pretrain_lm = load_stage("pretrain_lm")
    pretrain_lm.run(["--run_dir", str(reference_dir), *args])

    def crash(self, batch, batch_idx):
        if self.global_step == 13:
            raise RuntimeError("simulated crash")

    with monkeypatch.context() as patch:
        patch.setattr(CausalLMPretrainModule, "on_train_batch_start", crash, raising=False)
        with pytest.raises(RuntimeError, match="simulated crash"):
            pretrain_lm.run(["--run_dir", str(tiny_prepared), *args])
    out = tiny_prepared / "lm"
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    # 5 batches per epoch: saves at steps 4, 5 (epoch end), 8, 10 (epoch end), 12 (mid-epoch)
    assert saved["global_step"] == 12 and saved["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 2
    steps_run = record_training_steps(monkeypatch, CausalLMPretrainModule)
    manifest = pretrain_lm.run(["--run_dir", str(tiny_prepared), *args])
    assert steps_run == [12, 13, 14]  # resumed from the checkpoint, not started over
    assert manifest["metrics"]["steps"] == 15  # 3 epochs of 5 batches
    a, b = load_file(out / "model.safetensors"), load_file(reference_dir / "lm" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def test_unfinished_run_with_another_config_starts_over(upstream, tmp_path, monkeypatch, capsys):
    run_dir = copy_run(upstream, tmp_path / "run")

    def crash(self, batch, batch_idx):
        if self.global_step == 5:
            raise RuntimeError("simulated crash")

    with monkeypatch.context() as patch:
        patch.setattr(PlannerModule, "on_train_batch_start", crash, raising=False)
        with pytest.raises(RuntimeError):
            planner_run(run_dir, "--checkpoint_every_n_steps", "2")
    capsys.readouterr()
    changed = planner_run(run_dir, "--model.lr", "5e-3")
    assert "starting over" in capsys.readouterr().out
    fresh = planner_run(copy_run(upstream, tmp_path / "fresh"), "--model.lr", "5e-3")
    assert changed["metrics"]["val/top1"] == pytest.approx(fresh["metrics"]["val/top1"], abs=1e-9)


def test_a_kill_while_saving_leaves_the_previous_checkpoint(upstream, tmp_path, monkeypatch):
    run_dir = copy_run(upstream, tmp_path / "run")
    real_save = L.Trainer.save_checkpoint
    steps: list[int] = []

    def dies_on_third_save(self, filepath, *args, **kwargs):
        steps.append(self.global_step)
        if len(steps) == 3:
            Path(filepath).write_bytes(b"half a checkpoint")  # what a kill mid-write leaves
            raise KeyboardInterrupt
        return real_save(self, filepath, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(L.Trainer, "save_checkpoint", dies_on_third_save)
        with pytest.raises(SystemExit):
            load_stage("pretrain_planner").main(["--run_dir", str(run_dir), *PLANNER_ARGS, "--checkpoint_every_n_steps", "2"])
    checkpoint = torch.load(run_dir / "3_planner" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == steps[1] > 0  # the second save, intact
    steps_run = record_training_steps(monkeypatch, PlannerModule)
    manifest = planner_run(run_dir, "--checkpoint_every_n_steps", "2")  # and the run resumes from it
    assert steps_run == list(range(steps[1], manifest["metrics"]["steps"]))
    assert manifest["metrics"]["steps"] > steps[2]


def crash_planner_after_a_checkpoint(run_dir: Path, monkeypatch) -> Path:
    """A pretrain-planner run killed at step 5 (checkpoints every 2 steps); its last.ckpt."""
    def crash(self, batch, batch_idx):
        if self.global_step == 5:
            raise RuntimeError("simulated crash")

    with monkeypatch.context() as patch:
        patch.setattr(PlannerModule, "on_train_batch_start", crash, raising=False)
        with pytest.raises(RuntimeError):
            planner_run(run_dir, "--checkpoint_every_n_steps", "2")
    return run_dir / "3_planner" / "checkpoints" / "last.ckpt"


def test_resume_reads_the_checkpoint_with_weights_only(upstream, tmp_path, monkeypatch, caplog):
    """Every torch.load of a resumed stage refuses pickled objects (Lightning's own default unpickles)."""
    run_dir = copy_run(upstream, tmp_path / "run")
    saved_step = torch.load(crash_planner_after_a_checkpoint(run_dir, monkeypatch), weights_only=True)["global_step"]
    real_load, loads = torch.load, []

    def recording_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    steps_run = record_training_steps(monkeypatch, PlannerModule)
    with caplog.at_level("INFO"):
        planner_run(run_dir, "--checkpoint_every_n_steps", "2")
    assert steps_run[0] == saved_step > 0  # it did resume
    assert len(loads) >= 2 and all(flag is True for flag in loads)  # our check, then Lightning's restore
    assert "weights_only" not in caplog.text  # nothing loaded or saved with Lightning's unpickling default


def test_a_checkpoint_holding_a_pickled_object_is_refused_without_running_it(upstream, tmp_path, monkeypatch, capsys):
    import builtins

    run_dir = copy_run(upstream, tmp_path / "run")
    last = crash_planner_after_a_checkpoint(run_dir, monkeypatch)
    marker = tmp_path / "the-payload-ran"

    class Payload:
        def __reduce__(self):
            return builtins.open, (str(marker), "w")

    checkpoint = torch.load(last, weights_only=True)
    torch.save({**checkpoint, "extra": Payload()}, last)
    before = last.read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        load_stage("pretrain_planner").main(["--run_dir", str(run_dir), *PLANNER_ARGS, "--checkpoint_every_n_steps", "2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "holds a pickled io.open besides tensors" in err and "delete" in err
    assert not marker.exists() and last.read_bytes() == before  # never run, never deleted
    last.write_bytes(b"not a checkpoint at all")
    with pytest.raises(SystemExit) as exit_info:
        load_stage("pretrain_planner").main(["--run_dir", str(run_dir), *PLANNER_ARGS, "--checkpoint_every_n_steps", "2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "is not a readable checkpoint" in err and "Traceback" not in err


# ---------------------------------------------------------------------------- determinism
def test_same_seed_gives_byte_identical_embeddings_and_clusters_and_equal_planner_weights(
        tiny_prepared, tiny_encoder_dir, tmp_path):
    runs = [tiny_prepared, tmp_path / "again"]
    shutil.copytree(tiny_prepared, runs[1])
    for run_dir in runs:
        load_stage("embed").run(["--run_dir", str(run_dir), "--model.encoder", str(tiny_encoder_dir),
                            "--data.batch_size", "4", "--trainer.enable_progress_bar", "false"])
        load_stage("cluster").run(["--run_dir", str(run_dir), "--model.num_clusters", "4", "--trainer.max_epochs", "10",
                              "--trainer.enable_progress_bar", "false"])
        planner_run(run_dir, "--data.batch_size", "4", "--data.context_sentences", "3")
    for name in ("1_embed/embeddings.npy", "2_cluster/centroids.npy", "2_cluster/actions.npy"):
        assert (runs[0] / name).read_bytes() == (runs[1] / name).read_bytes(), name
    a, b = planner_weights(runs[0]), planner_weights(runs[1])
    assert all(torch.equal(a[name], b[name]) for name in a)
    manifest = json.loads((runs[0] / "3_planner" / "manifest.json").read_text())
    assert manifest["seed"] == 42 and {"torch", "lightning", "transformers"} <= set(manifest["versions"])


def test_another_seed_gives_other_planner_weights(upstream, tmp_path):
    """The determinism test above could not pass by accident: the seed does reach the weights."""
    planner_run(copy_run(upstream, tmp_path / "a"), "--seed_everything", "1")
    planner_run(copy_run(upstream, tmp_path / "b"), "--seed_everything", "2")
    a, b = planner_weights(tmp_path / "a"), planner_weights(tmp_path / "b")
    assert not all(torch.equal(a[name], b[name]) for name in a)


# ---------------------------------------------------------------------------- odd inputs
def test_sentences_longer_than_the_encoder_window_are_embedded_and_counted(tmp_path, tiny_encoder_dir, capsys):
    from planner_lm.corpus import CorpusConfig
    from planner_lm.pipeline.prepare import PrepareConfig, SplitConfig, prepare_corpus

    rambling = "The cat " + " and the cat".join(" sat" for _ in range(120)) + "."
    docs = [{"title": f"d{i}", "text": f"The cat sat. {rambling if i == 0 else 'It slept.'} The end."} for i in range(6)]
    corpus = tmp_path / "long.jsonl"
    corpus.write_text("\n".join(json.dumps(d) for d in docs) + "\n", encoding="utf-8")
    run_dir = tmp_path / "run"
    prepare_corpus(PrepareConfig(run_dir=str(run_dir), corpus=CorpusConfig(name=str(corpus)),
                              split=SplitConfig(val_docs=1, test_docs=1), workers=1))
    manifest = load_stage("embed").run(["--run_dir", str(run_dir), "--model.encoder", str(tiny_encoder_dir),
                                   "--trainer.enable_progress_bar", "false"])
    assert manifest["metrics"]["truncated_sentences"] == 1
    assert "longer than the encoder's window of 48 tokens" in capsys.readouterr().out
    vectors = np.load(run_dir / "1_embed" / "embeddings.npy").astype(np.float32)
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)


def test_documents_of_a_single_sentence_train_a_planner(tmp_path):
    """Every example then has an empty context: the planner predicts from its start vector alone."""
    run_dir = make_fake_upstream(tmp_path, num_docs=80, sentences_per_doc=1, dim=16, k=8)
    manifest = planner_run(run_dir)
    assert manifest["facts"]["train_sentences"] == 64
    assert 0.0 <= manifest["metrics"]["val/top1"] <= 1.0 and np.isfinite(manifest["metrics"]["val/nll"])


# ---------------------------------------------------------------------------- offline
def test_the_suite_cannot_reach_the_network():
    with pytest.raises(NetworkBlocked):
        socket.create_connection(("203.0.113.7", 443), timeout=1)


@pytest.mark.parametrize("stage_name, args", [
    ("prepare", ["--split.no_such_option", "3"]),
    ("pretrain_planner", ["--model.no_such_option", "3"]),
    ("finetune_joint", ["--trainer.no_such_option", "3"]),
])
def test_an_option_that_does_not_exist_is_named_without_a_traceback(stage_name, args, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_stage(stage_name).main(["--run_dir", str(tmp_path / "run"), *args])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "no_such_option" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing was started


def test_a_yaml_key_that_does_not_exist_is_named(tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text("model:\n  learning_rate: 0.1\n")  # the option is model.lr
    with pytest.raises(SystemExit) as exit_info:
        load_stage("pretrain_planner").main(["--run_dir", str(tmp_path / "run"), "--config", str(config)])
    assert exit_info.value.code != 0 and "learning_rate" in capsys.readouterr().err
