"""SIGKILL every stage of the chain at a random point, re-run its make target, get the same outputs.

The whole chain of the `tiny` preset runs twice through `make`, networking blocked: once
uninterrupted (the reference) and once with every stage killed (SIGKILL to its process group,
so make and Python die together) at a random moment after it has saved some partial work, then
re-run with the same target. Each stage must finish from what survived and write outputs equal to
the reference's; a manifest found after a kill (the stage had just finished) must be complete.

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

from planner_lm.artifacts import read_manifest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

# (make target, stage directory, files whose appearance means partial work exists, outputs to compare)
CHAIN = [
    ("prepare", "0_prepare", None, ["train", "val", "test"]),
    ("embed", "1_embed", "shards/shard_*.npy", ["embeddings.npy"]),
    ("cluster", "2_cluster", "checkpoints/last.ckpt", ["centroids.npy", "actions.npy"]),
    ("pretrain-lm", "lm", "checkpoints/last.ckpt", ["model.safetensors"]),
    ("pretrain-planner", "3_planner", "checkpoints/last.ckpt", ["planner"]),
    ("finetune-joint", "4_joint-soft", "checkpoints/last.ckpt", ["lm", "planner"]),
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
    # this interpreter runs the stages (PY), and set-up is not make's business here (STAMP empty)
    return ["make", "--no-print-directory", target, f"RUN={run}", "PRESET=tiny", "BASELINES=",
            f"PY={sys.executable}", "STAMP=", "ARGS_embed=--trainer.enable_progress_bar false"]


def run_target(target: str, run: Path, env: dict[str, str], stage_dir: str, marker: str | None,
               kill_at: float | None = None) -> dict[str, float | None]:
    """Run a target, noting when its partial work and its manifest appear (seconds after the start).

    With `kill_at` (seconds after the partial-work marker appears, or after the start for stages
    without one), SIGKILL make and its stage at that moment instead of waiting for the end.
    """
    log_path = run.parent / f"{run.name}-{target}.log"  # a file, not a pipe: a full pipe would block make
    with open(log_path, "a") as log_file:
        process = subprocess.Popen(make_command(target, run), cwd=ROOT, env=env, stdout=log_file,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    started = time.monotonic()
    seen: dict[str, float | None] = {"marker": None if marker else 0.0, "manifest": None, "killed": None}
    while process.poll() is None:
        now = time.monotonic() - started
        if seen["marker"] is None and any((run / stage_dir).glob(marker)):
            seen["marker"] = now
        if seen["manifest"] is None and (run / stage_dir / "manifest.json").exists():
            seen["manifest"] = now
        if kill_at is not None and seen["marker"] is not None and now >= seen["marker"] + kill_at:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            seen["killed"] = now
            return seen
        time.sleep(0.01)
    assert process.returncode == 0, f"make {target} failed:\n{log_path.read_text()[-4000:]}"
    if seen["manifest"] is None:
        seen["manifest"] = time.monotonic() - started
    return seen


def same_output(a: Path, b: Path, roots: tuple[Path, Path]) -> None:
    """Equal files (arrays, tensors and metrics compared by value; timings and run paths ignored)."""
    if a.is_dir():
        for child in sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file()):
            same_output(a / child, b / child, roots)
    elif a.suffix == ".npy":
        np.testing.assert_array_equal(np.load(a), np.load(b), err_msg=str(a))
    elif a.suffix in (".pt", ".safetensors"):
        load = (lambda p: torch.load(p, map_location="cpu", weights_only=True)) if a.suffix == ".pt" else \
            (lambda p: __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(p)))
        x, y = load(a), load(b)
        x, y = (x.get("state_dict", x), y.get("state_dict", y))
        for name, tensor in x.items():
            if isinstance(tensor, torch.Tensor):
                torch.testing.assert_close(tensor, y[name], rtol=0, atol=1e-6, msg=f"{a}: {name}")
    elif a.name == "metrics.json":
        ppl = lambda p: {row["run"] + "/" + row["source"]: row["ppl"]["value"]  # noqa: E731
                         for row in json.loads(p.read_text())["rows"] if "ppl" in row}
        assert ppl(a) and ppl(a) == pytest.approx(ppl(b), rel=1e-6), a
    elif a.suffix == ".json":  # e.g. the conditioned LM's config names its base LM by path
        def normalised(path: Path, root: Path) -> object:
            data = json.loads(path.read_text().replace(str(root), "RUN"))
            if isinstance(data, dict):  # a planner records its upstream manifests' hashes: per run
                data.pop("upstream", None)
            return data
        assert normalised(a, roots[0]) == normalised(b, roots[1]), a
    else:
        assert a.read_bytes() == b.read_bytes(), a


def test_every_stage_resumes_after_sigkill_with_the_same_outputs(tmp_path, env) -> None:
    seed = int(os.environ.get("PLANNER_LM_KILL_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    log = [f"PLANNER_LM_KILL_SEED={seed}"]
    print(log[0], flush=True)
    chain_seconds = 0.0
    for target, stage_dir, marker, outputs in CHAIN:
        times = run_target(target, reference, env, stage_dir, marker)
        chain_seconds += times["manifest"]
        # kill between "partial work exists" and "the manifest was written" in the reference run
        # (for prepare and evaluate, which keep nothing: in the second half of that span)
        low = 0.0 if marker else 0.5 * times["manifest"]
        kill_at = rng.uniform(low, times["manifest"] - (times["marker"] or 0.0))
        seen = run_target(target, crashed, env, stage_dir, marker, kill_at=kill_at)
        what = f"killed after {seen['killed']:.1f} s" if seen["killed"] is not None else "finished before the kill"
        if (crashed / stage_dir / "manifest.json").exists():  # killed after finishing: must be complete
            read_manifest(crashed / stage_dir)
            what += " (its manifest was already written)"
        log.append(f"{target}: {what}")
        print(log[-1], flush=True)  # shown with -s; the seed line lets a failure be replayed
        run_target(target, crashed, env, stage_dir, marker)
        for name in outputs:
            same_output(reference / stage_dir / name, crashed / stage_dir / name, (reference, crashed))
    print(f"the uninterrupted tiny chain took {chain_seconds:.0f} s", flush=True)
    mid_run = sum("killed" in line and "manifest" not in line for line in log)
    assert mid_run >= len(CHAIN) - 2, "\n".join(log)  # a stage may finish first now and then; most must not
