"""SIGKILL every stage of the chain at a random point, re-run its make target, get the same outputs.

The whole chain of the `tiny` preset runs twice through `make`, networking blocked: once
uninterrupted (the reference) and once with every stage killed (SIGKILL to its process group,
so make and Python die together) at a random moment after it has saved some partial work, then
re-run with the same target. Each stage must finish from what survived and write outputs equal to
the reference's, and no manifest may exist between the kill and the re-run.

Slow (a few minutes): `make test-slow`. Set PLANNER_LM_KILL_SEED to replay a run's kill times.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

# (make target, stage directory, files whose appearance means partial work exists, outputs to compare)
CHAIN = [
    ("prepare", "0_prepare", None, ["train", "val", "test"]),
    ("embed", "1_embed", "shards/shard_*.npy", ["embeddings.npy"]),
    ("cluster", "2_cluster", "checkpoints/last.ckpt", ["centroids.npy", "actions.npy"]),
    ("pretrain-lm", "lm", "checkpoints/last.ckpt", ["model.safetensors"]),
    ("pretrain-planner", "3_planner", "checkpoints/last.ckpt", ["planner.pt"]),
    ("finetune-joint", "4_joint-soft", "checkpoints/last.ckpt", ["lm/model.safetensors", "planner.pt"]),
    ("evaluate", "5_eval", None, ["metrics.json"]),
]

NO_NETWORK = '''
import socket
_connect = socket.socket.connect
def _local_only(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if self.family == socket.AF_UNIX or host in ("127.0.0.1", "localhost", "::1"):
        return _connect(self, address)
    raise OSError(f"network access attempted in an offline test: {address!r}")
socket.socket.connect = _local_only
'''


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """The make environment: hub offline, and a sitecustomize that refuses non-local connections."""
    site = tmp_path_factory.mktemp("no_network")
    (site / "sitecustomize.py").write_text(NO_NETWORK)
    return {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONHASHSEED": "0",
            "OMP_NUM_THREADS": "1"}


def make_command(target: str, run: Path) -> list[str]:
    return ["make", "--no-print-directory", target, f"RUN={run}", "PRESET=tiny", "BASELINES=",
            f"VENV={Path(sys.executable).parent.parent}", "ARGS_embed=--trainer.enable_progress_bar false"]


def run_target(target: str, run: Path, env: dict[str, str]) -> float:
    """Run a target to completion; return its wall time."""
    started = time.monotonic()
    done = subprocess.run(make_command(target, run), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"make {target} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return time.monotonic() - started


def kill_target(target: str, run: Path, env: dict[str, str], stage_dir: str, marker: str | None,
                reference_seconds: float, rng: random.Random) -> str:
    """Start a target, SIGKILL it at a random point after partial work exists; describe what happened."""
    process = subprocess.Popen(make_command(target, run), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    started = time.monotonic()
    if marker is None:  # nothing resumable: kill anywhere in the second half of a normal run
        deadline = started + rng.uniform(0.5, 0.95) * reference_seconds
    else:
        while not list((run / stage_dir).glob(marker)) and process.poll() is None:
            time.sleep(0.02)
        left = max(0.0, reference_seconds - (time.monotonic() - started))
        deadline = time.monotonic() + rng.uniform(0.0, 0.6) * left
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    if process.poll() is not None:
        return f"finished before the kill (exit {process.returncode})"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return f"killed after {time.monotonic() - started:.1f} s"


def same_output(a: Path, b: Path) -> None:
    """Equal files (arrays, tensors and metrics compared by value; timings ignored)."""
    if a.is_dir():
        for child in sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file()):
            same_output(a / child, b / child)
    elif a.suffix == ".npy":
        np.testing.assert_array_equal(np.load(a), np.load(b), err_msg=str(a))
    elif a.suffix in (".pt", ".safetensors"):
        load = (lambda p: torch.load(p, map_location="cpu", weights_only=False)) if a.suffix == ".pt" else \
            (lambda p: __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(p)))
        x, y = load(a), load(b)
        x, y = (x.get("state_dict", x), y.get("state_dict", y))
        for name, tensor in x.items():
            if isinstance(tensor, torch.Tensor):
                torch.testing.assert_close(tensor, y[name], rtol=0, atol=1e-6, msg=f"{a}: {name}")
    elif a.name == "metrics.json":
        ppl = lambda p: {row["run"] + "/" + row["source"]: row["ppl"]["value"]  # noqa: E731
                         for row in json.loads(p.read_text())["rows"]}
        assert ppl(a) == pytest.approx(ppl(b), rel=1e-6), a
    else:
        assert a.read_bytes() == b.read_bytes(), a


def test_every_stage_resumes_after_sigkill_with_the_same_outputs(tmp_path, env) -> None:
    seed = int(os.environ.get("PLANNER_LM_KILL_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    log = [f"PLANNER_LM_KILL_SEED={seed}"]
    for target, stage_dir, marker, outputs in CHAIN:
        seconds = run_target(target, reference, env)
        what = kill_target(target, crashed, env, stage_dir, marker, seconds, rng)
        log.append(f"{target}: {what}")
        if what.startswith("killed"):
            assert not (crashed / stage_dir / "manifest.json").exists(), f"{target}: a killed stage left a manifest"
        run_target(target, crashed, env)
        for name in outputs:
            same_output(reference / stage_dir / name, crashed / stage_dir / name)
    print("\n".join(log))
    killed = sum("killed" in line for line in log)
    assert killed >= len(CHAIN) - 2, "\n".join(log)  # a stage may occasionally finish first; most must be killed
