"""One rank-0 mechanism for every stage (`planner_lm.rank_zero`), under torchrun and a plain launch.

Two CPU processes (gloo, loopback only) are started either by `torchrun` or, as `srun` would, each
with `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR=127.0.0.1` and `MASTER_PORT` set. Rank 0
decides; every rank gets its answer, and when rank 0 refuses, every rank prints the same one-line
`error:` and exits at once (before, evaluate's other ranks waited at a barrier for the
process-group timeout, and a Lightning stage's rank 1 under a plain launch failed for want of an
answer in its environment).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_crash_resume import NO_NETWORK

ROOT = Path(__file__).resolve().parents[1]
LAUNCHES = ("torchrun", "env")
PROMPT_S = 120  # far below any process-group timeout (gloo's default: 30 minutes)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    site = tmp_path_factory.mktemp("no_network")
    (site / "sitecustomize.py").write_text(NO_NETWORK)
    path = os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "GLOO_SOCKET_IFNAME": "lo", "PLANNER_LM_PRECISION": "32-true"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(how: str, script: list[str], env: dict[str, str]) -> tuple[list[int], str, str, float]:
    """Two processes of `script` (return codes, stdout, stderr, seconds); `how`: torchrun or env."""
    port, started = _free_port(), time.monotonic()
    if how == "torchrun":
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
                               "2", "--master-addr", "127.0.0.1", "--master-port", str(port), *script],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=PROMPT_S)
        return [done.returncode], done.stdout, done.stderr, time.monotonic() - started
    ranks = [subprocess.Popen([sys.executable, *script], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                   "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for rank in range(2)]
    outputs = []
    try:
        outputs = [rank.communicate(timeout=PROMPT_S) for rank in ranks]
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
    return ([r.returncode for r in ranks], "".join(o for o, _ in outputs), "".join(e for _, e in outputs),
            time.monotonic() - started)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


DECIDE = '''
from lightning.pytorch import Trainer
from planner_lm.errors import UserError, friendly_errors
from planner_lm.rank_zero import decided_on_rank_zero

trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                  enable_checkpointing=False)
answer = decided_on_rank_zero(trainer, "which", lambda: {"chosen_by": trainer.global_rank})
print(f"rank {trainer.global_rank} got {answer['chosen_by']}", flush=True)


def refuse():
    raise UserError("the stage folder holds your notes; nothing was touched")


with friendly_errors():
    decided_on_rank_zero(trainer, "refused", refuse)
print("not reached", flush=True)
'''


@pytest.mark.parametrize("how", LAUNCHES)
def test_a_lightning_stages_decision_is_rank_zeros_and_its_refusal_ends_every_rank(tmp_path, env, how):
    script = tmp_path / "decide.py"
    script.write_text(DECIDE)
    codes, out, err, _ = launch(how, [str(script)], env)
    assert "rank 0 got 0" in out and "rank 1 got 0" in out, err[-3000:]
    assert "not reached" not in out and all(code != 0 for code in codes)
    lines = error_lines(err)
    assert lines == ["error: the stage folder holds your notes; nothing was touched"] * 2, err[-3000:]
    if how == "env":
        assert codes == [2, 2] and "Traceback" not in err


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory) -> Path:
    from test_evaluate_stage import fake_joint_runs

    run = fake_joint_runs(tmp_path_factory.mktemp("ranks"), ("fixed",), num_docs=10)
    (run / "5_eval").mkdir()
    (run / "5_eval" / "notes.md").write_text("the user's notes")  # not the project's: rank 0 refuses it
    return run


@pytest.mark.parametrize("how", LAUNCHES)
def test_evaluate_refused_on_rank_zero_ends_every_rank_promptly_with_one_line(evaluated_run, env, how):
    codes, out, err, seconds = launch(how, ["stages/evaluate.py", "--run_dir", str(evaluated_run), "--device", "cpu",
                                            "--structure.docs", "0"], env)
    lines = error_lines(err)
    assert len(lines) == 2 and len(set(lines)) == 1, err[-3000:]
    assert "5_eval holds files planner-lm did not write" in lines[0] and all(code != 0 for code in codes)
    if how == "env":
        assert codes == [2, 2] and "Traceback" not in err
    assert seconds < PROMPT_S and (evaluated_run / "5_eval" / "notes.md").read_text() == "the user's notes"
    assert sorted(p.name for p in (evaluated_run / "5_eval").iterdir()) == ["notes.md"]
