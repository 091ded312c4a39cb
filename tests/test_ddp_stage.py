"""A training stage started by torchrun on 2 CPU processes (gloo), through its real entry point.

Under torchrun every process runs the whole stage script at once, so only global rank 0 may
prepare, replace or clean the stage folder and choose the checkpoint to resume from; the other
rank must wait and use the same answer (`planner_lm.rank_zero`). `pretrain-planner` (the
cheapest training stage) runs: fresh, then again with `--overwrite true` and a changed config,
and once with one rank SIGKILLed mid-run followed by the same command. Each must end with the
weights of one process on the same global batch (the tolerance of `tests/test_ddp.py`), and a
resumed run must continue from its checkpoint, not start over.

Slow (about a minute per test on 2 cores): every launch starts two Python processes.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fixtures_stages import load_stage, make_fake_upstream
from test_crash_resume import NO_NETWORK
from test_ddp import TOLERANCE, relative_gap
from planner_lm.artifacts import manifest_hash, read_manifest
from planner_lm.models.planner import Planner

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
K, DIM = 8, 16
# 96 training sentences in global batches of 8: 12 steps per epoch, none of them short (a short last
# batch is padded by DDP's sampler). The kill test checkpoints every 4 steps and rank 1 SIGKILLs
# itself at step 18, so the run resumes from step 16, a third of the way into the second epoch.
KILL_AT, CHECKPOINT_EVERY = 18, 4
ARGS = ["--config", "configs/pretrain_planner.yaml", "--model.ffn_dim", "16", "--model.dropout", "0.0",
        "--model.lr", "1e-2", "--model.export_best", "false", "--data.batch_size", "8", "--data.num_workers", "0",
        "--data.context_sentences", "4", "--data.max_train_sentences", "96", "--trainer.max_epochs", "2",
        "--trainer.val_check_interval", "1.0", "--trainer.enable_progress_bar", "false",
        "--trainer.log_every_n_steps", "5", "--trainer.accelerator", "cpu",
        "--trainer.precision", "32-true"]  # fp32: the tolerance is fp32's, whatever this host would pick
TWO = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]

# in every launched process: rank 1 SIGKILLs itself at a given step; rank 0 logs the steps it trains
HOOK = '''
import os
if os.environ.get("PLANNER_LM_TEST_KILL_AT") or os.environ.get("PLANNER_LM_TEST_STEPS"):
    import signal
    from planner_lm.lit import checkpointing

    _step_seed = checkpointing.StepSeed.on_train_batch_start

    def _on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        kill_at, steps = os.environ.get("PLANNER_LM_TEST_KILL_AT"), os.environ.get("PLANNER_LM_TEST_STEPS")
        if steps and trainer.global_rank == 0:
            with open(steps, "a") as log:
                log.write(f"{trainer.global_step}\\n")
        if kill_at and trainer.global_rank == 1 and trainer.global_step == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
        _step_seed(self, trainer, pl_module, batch, batch_idx)

    checkpointing.StepSeed.on_train_batch_start = _on_train_batch_start
'''

pretrain_planner = load_stage("pretrain_planner")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    return make_fake_upstream(tmp_path_factory.mktemp("upstream"), num_docs=30, sentences_per_doc=(2, 10), dim=DIM, k=K)


@pytest.fixture(scope="module")
def one_process(upstream, tmp_path_factory) -> tuple[dict, dict]:
    """Planner weights at initialisation and after the stage, trained by one process (in this one)."""
    cwd = Path.cwd()
    os.chdir(ROOT)
    try:
        weights = []
        for extra in (["--trainer.max_steps", "0"], []):  # (the last one wins)
            run = tmp_path_factory.mktemp("one") / "run"
            shutil.copytree(upstream, run)
            pretrain_planner.run([*ARGS, "--run_dir", str(run), *extra])
            weights.append(Planner.from_pretrained(run / "3_planner").state_dict())
    finally:
        os.chdir(cwd)
    return weights[0], weights[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(NO_NETWORK + HOOK)
    path = os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def torchrun(run: Path, env: dict[str, str], *extra: str, **settings: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "stages/pretrain_planner.py", *ARGS, *TWO, "--run_dir", str(run), *extra]
    return subprocess.run(command, cwd=ROOT, env={**env, **settings}, capture_output=True, text=True, timeout=300)


def assert_one_process_weights(run: Path, one_process: tuple[dict, dict]) -> None:
    before, single = one_process
    two = Planner.from_pretrained(run / "3_planner").state_dict()
    assert relative_gap(before, single, two) < TOLERANCE


def fresh_run(upstream: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(upstream, run)
    (run / "notes.txt").write_text("the user's own notes")
    return run


def test_fresh_run_then_overwrite_with_another_config(upstream, one_process, env, tmp_path):
    run = fresh_run(upstream, tmp_path)
    first = torchrun(run, env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert_one_process_weights(run, one_process)
    old = manifest_hash(run / "3_planner")

    # another config (logging only, so the weights must not change), replacing the finished run
    replaced = torchrun(run, env, "--trainer.log_every_n_steps", "2", "--overwrite", "true")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    manifest = read_manifest(run / "3_planner", "pretrain_planner")
    assert manifest.hash != old and manifest.config["trainer.log_every_n_steps"] == 2
    assert_one_process_weights(run, one_process)
    assert (run / "notes.txt").read_text() == "the user's own notes"
    assert not list(run.glob(".3_planner.*"))  # the replaced folder is gone, not parked beside


def test_one_rank_killed_mid_run_then_the_same_command_resumes(upstream, one_process, env, tmp_path):
    run = fresh_run(upstream, tmp_path)
    steps = tmp_path / "steps.txt"
    every = ("--checkpoint_every_n_steps", str(CHECKPOINT_EVERY))
    killed = torchrun(run, env, *every, PLANNER_LM_TEST_KILL_AT=str(KILL_AT))
    assert killed.returncode != 0
    assert not (run / "3_planner" / "manifest.json").exists()
    saved = torch.load(run / "3_planner" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 16  # mid second epoch: the resumed processes must skip its first 4 batches

    again = torchrun(run, env, *every, PLANNER_LM_TEST_STEPS=str(steps))
    assert again.returncode == 0, again.stderr[-3000:]
    trained = [int(line) for line in steps.read_text().split()]
    assert trained[0] == saved["global_step"]  # continued from the checkpoint, not from scratch
    manifest = read_manifest(run / "3_planner", "pretrain_planner")
    assert manifest.metrics["steps"] == trained[-1] + 1
    assert json.loads((run / "3_planner" / "checkpoints" / "resume.json").read_text())["config_hash"]
    assert_one_process_weights(run, one_process)
    assert (run / "notes.txt").read_text() == "the user's own notes"
