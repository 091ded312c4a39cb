"""FSDP (FSDP2 through Lightning's ModelParallelStrategy, configs/strategies/fsdp.yaml) in
finetune-joint: two CPU processes on gloo, a tiny Llama-family base trained in full, against one
process on the same global batch. The hand-off gathers full weights to rank 0; reloaded without
Lightning, the LM and planner give the same weights and validation perplexity as the 1-process run.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fixtures_stages import ROOT, make_fake_upstream, write_fake_lm, write_fake_planner
from test_ddp import relative_gap
from planner_lm.artifacts import read_manifest
from planner_lm.models.conditioning import ActionConditionedLM
from planner_lm.models.planner import Planner
from planner_lm.run_folder import stage_dir

K, DIM = 8, 16
TOLERANCE = 1e-3

pytestmark = pytest.mark.slow


def stage(run_dir: Path, *extra: str) -> None:
    args = ["--run_dir", str(run_dir), "--model.selection", "soft", "--model.base_mode", "full",
            "--model.conditioned_layers", "[2, 3]", "--model.lr", "1e-3", "--model.export_best", "false",
            "--data.window", "24", "--data.batch_size", "4", "--trainer.max_steps", "3",
            "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",  # fp32: TOLERANCE is fp32's
            "--trainer.enable_progress_bar", "false", "--seed_everything", "0", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "stages" / "finetune_joint.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


def test_fsdp_trains_saves_and_reloads_like_one_process(tmp_path):
    runs = {}
    for name, extra in (("one", ("--trainer.devices", "1")),
                        ("fsdp", ("--trainer.devices", "2", "--config", str(ROOT / "configs/strategies/fsdp.yaml")))):
        run = make_fake_upstream(tmp_path / name, num_docs=30, sentences_per_doc=(1, 8), dim=DIM, k=K)
        write_fake_lm(run, "llama")
        write_fake_planner(run, K, DIM, 4)
        stage(run, *extra)
        runs[name] = stage_dir(run, "finetune_joint", "soft")
    one, fsdp = (ActionConditionedLM.from_pretrained(runs[n] / "lm") for n in ("one", "fsdp"))
    start = Planner.from_pretrained(stage_dir(runs["one"].parent, "pretrain_planner")).state_dict()
    planners = {n: Planner.from_pretrained(runs[n]).state_dict() for n in runs}
    # the planner moved, and by the same step on one process and on two sharded ones
    assert relative_gap(start, planners["one"], planners["fsdp"]) < TOLERANCE
    for (name, a), (_, b) in zip(one.state_dict().items(), fsdp.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=name)
    # reloaded without Lightning, the sharded run's hand-off scores the validation windows as the
    # one-process run did during training (its manifest's perplexity)
    from planner_lm.data.joint_data import JointDataModule
    from planner_lm.lit.losses import next_token_nll

    data = JointDataModule(run_dir=str(runs["one"].parent), window=24, batch_size=4)
    data.prepare_data()
    data.setup("fit")
    planner, lm = Planner.from_pretrained(runs["fsdp"]).eval(), fsdp.eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for batch in data.val_dataloader():
            weights = torch.softmax(planner(batch["plan_context"], batch["plan_context_mask"]), -1)[batch["token_plan"]]
            nll, tokens = next_token_nll(lm(batch["input_ids"], batch["attention_mask"], action_weights=weights).logits,
                                         batch["labels"])
            total, count = total + nll.double(), count + int(tokens)
    expected = read_manifest(runs["one"], "finetune_joint").metrics["val/ppl"]
    assert float(torch.exp(total / count)) == pytest.approx(expected, rel=1e-3)
