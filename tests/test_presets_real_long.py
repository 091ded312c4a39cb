"""`make real` and `make long` wire their stages as documented: every command they would run parses
and resolves (a dry run: `make -n`, then each stage's own parser with --print_config; no model is
loaded, so SmolLM2 need not be installed)."""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fixtures_stages import ROOT, load_stage

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def stage_commands(target: str, tmp_path: Path, **variables: str) -> list[tuple[str, list[str]]]:
    """(stage, arguments) of every stage command `make -n <target>` prints, without repeats."""
    venv = Path(sys.executable).parent.parent
    args = ["make", "-n", target, f"VENV={venv}", *(f"{k}={v}" for k, v in variables.items())]
    lines = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
    commands = []
    for line in dict.fromkeys(lines):
        if " -m planner_lm " not in line:  # the Makefile runs every stage as `python -m planner_lm <stage>`
            continue
        words = shlex.split(line.replace(" && true", ""))
        if len(words) > 3 and words[1:3] == ["-m", "planner_lm"] and not words[3].startswith("-"):
            commands.append((words[3].replace("-", "_"), words[4:]))
    return commands


def resolved(stage: str, args: list[str], capsys) -> dict:
    """The stage's resolved configuration for `args` (its parser's --print_config)."""
    with pytest.raises(SystemExit) as exit_:
        load_stage(stage).run([*args, "--print_config"])
    assert exit_.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_make_real_by_default_trains_pred_soft_fixed_oracle_and_the_null_run_only(tmp_path, capsys):
    """The default answers the verdicts' questions (oracle and soft against fixed and the untouched base, over the noise
    floor) and nothing else: every other control and extra is asked for by name."""
    commands = stage_commands("real", tmp_path, REAL_FROM=tmp_path / "demo")
    trained = {(Path(c["run_dir"]).name, c["model"]["selection"]) for c in
               (resolved(s, a, capsys) for s, a in commands if s == "finetune_joint")}
    assert trained == {("real-residual", s) for s in ("pred", "soft", "none", "fixed", "oracle")} | {("seed-43", "fixed")}
    corpora = [resolved(s, a, capsys)["corpus"]["name"] for s, a in commands if s == "evaluate" and "--corpus.name" in a]
    assert corpora == ["held_out"]


def test_make_real_trains_pred_then_soft_warm_with_the_planner_loss_and_its_controls(tmp_path, capsys):
    commands = stage_commands("real", tmp_path, REAL_FROM=tmp_path / "demo", REAL_STEPS="7",
                              REAL_RUNS="none fixed boundary oracle pred hard", REAL_EXTRAS="sotu planner-loss")
    joint, order = {}, []
    for stage, args in commands:
        config = resolved(stage, args, capsys)
        if stage == "finetune_joint":
            order.append((Path(config["run_dir"]).name, config["model"]["selection"]))
            joint[order[-1]] = config
        elif stage == "evaluate" and Path(config["run_dir"]).name == "real-residual" and config["corpus"] is None:
            assert "planner_soft_other_doc" in config["code_sources"]
    assert set(joint) >= {("real-residual", s) for s in ("pred", "soft", "none", "fixed", "boundary", "oracle", "hard")}
    for (where, selection), config in joint.items():
        assert config["data"]["lm"] == "smollm2-135m" and config["model"]["base_mode"] == "frozen"
        assert config["model"]["conditioning"] == "residual"  # the design make real measures by default
        assert config["model"]["conditioned_layers"] is None and config["model"]["lr"] == 1e-3
        assert config["trainer"]["max_steps"] == 7
    soft, pred = joint[("real-residual", "soft")], joint[("real-residual", "pred")]
    assert soft["data"]["init_from"] == "pred" and soft["model"]["planner_loss_weight"] == 1.0
    assert pred["data"]["init_from"] is None and pred["model"]["planner_loss_weight"] == 0.0
    # the variant: the same soft run without the planner loss
    assert joint[("soft-lm-loss", "soft")]["model"]["planner_loss_weight"] == 0.0
    # the order: pred is trained before soft needs it
    assert order.index(("real-residual", "pred")) < order.index(("real-residual", "soft"))
    corpora = {config["corpus"]["name"]: config for config in
               (resolved(s, a, capsys) for s, a in commands if s == "evaluate" and "--corpus.name" in a)}
    assert corpora["sotu"]["max_docs"] == 20
    # the verdicts' split: 2,400 documents the demo run never used, each run with its own codes only
    held_out = corpora["held_out"]
    assert held_out["corpus"]["max_docs"] == 2400 and held_out["corpus"]["sample_seed"] is not None
    assert held_out["code_sources"] == ["matched"] and held_out["structure"]["docs"] == 0
    # the noise floor: fixed again with seed 43, nothing else changed, scored by every evaluation of the run
    null = joint[("seed-43", "fixed")]
    assert null["seed_everything"] == 43 and joint[("real-residual", "fixed")]["seed_everything"] == 42
    def except_seed(config: dict) -> dict:
        return {**{k: v for k, v in config.items() if k not in ("seed_everything", "run_dir")},
                "data": {**config["data"], "run_dir": None}}

    assert except_seed(null) == except_seed(joint[("real-residual", "fixed")])
    evaluations = [resolved(s, a, capsys) for s, a in commands if s == "evaluate"]
    assert all(c["null_seed"] == (None if Path(c["run_dir"]).name == "soft-lm-loss" else 43) for c in evaluations)


def test_make_real_keeps_the_papers_adapters_under_their_own_name(tmp_path, capsys):
    """REAL_CONDITIONING=paper: the reference's adapters, in their own folder (real-paper), so runs of the
    two designs never mix and a changed design never re-prints the other's table."""
    commands = stage_commands("real", tmp_path, REAL_FROM=tmp_path / "demo", REAL_CONDITIONING="paper")
    joint = [resolved(s, a, capsys) for s, a in commands if s == "finetune_joint"]
    assert joint and all(c["model"]["conditioning"] == "paper" for c in joint)
    assert {Path(c["run_dir"]).name for c in joint} >= {"real-paper"}
    assert not [c for c in joint if Path(c["run_dir"]).name == "real-residual"]


def test_the_avx2_setting_of_make_real_trains_only_soft_cold_and_fixed(tmp_path, capsys):
    """The one-hour setting docs/results.md gives for AVX2 hosts: no pred, no warm start, no extras,
    the soft run without the planner loss."""
    commands = stage_commands("real", tmp_path, REAL_FROM=tmp_path / "demo", REAL_STEPS="150", REAL_RUNS="fixed",
                              REAL_WARM="", REAL_EXTRAS="", REAL_VAL_EVERY="75",
                              ARGS_finetune_joint_soft="--model.planner_loss_weight 0")
    joint = {resolved(s, a, capsys)["model"]["selection"]: resolved(s, a, capsys) for s, a in commands
             if s == "finetune_joint"}
    assert set(joint) == {"soft", "fixed"}
    assert joint["soft"]["data"]["init_from"] is None and joint["soft"]["model"]["planner_loss_weight"] == 0.0
    assert all(c["trainer"]["max_steps"] == 150 and c["trainer"]["val_check_interval"] == 75 for c in joint.values())
    corpora = [resolved(s, a, capsys)["corpus"]["name"] for s, a in commands if s == "evaluate" and "--corpus.name" in a]
    assert corpora == ["held_out"]  # no sotu; the verdicts' held-out split stays


def test_make_real_pred_budget_trains_pred_for_the_warm_soft_runs_total_steps(tmp_path, capsys):
    """REAL_EXTRAS=pred-budget: pred trained for soft's total steps (its own REAL_STEPS on pred's
    REAL_STEPS) in a variant that links soft and fixed, so their pair compares equal budgets."""
    commands = stage_commands("real", tmp_path, REAL_FROM=tmp_path / "demo", REAL_STEPS="7", REAL_EXTRAS="pred-budget",
                              REAL_HELD_OUT_DOCS="", REAL_NULL_SEED="")
    configs = [resolved(s, a, capsys) for s, a in commands if s in ("finetune_joint", "evaluate")]
    trained = {(Path(c["run_dir"]).name, c["model"]["selection"]): c for c in configs if "model" in c}
    assert trained[("pred-budget", "pred")]["trainer"]["max_steps"] == 14
    assert trained[("real-residual", "pred")]["trainer"]["max_steps"] == 7
    assert not [key for key in trained if key[0] == "seed-43"]  # REAL_NULL_SEED= : no null run
    assert all(c["null_seed"] is None for c in configs if "model" not in c)


def test_make_precisions_trains_only_the_other_side_in_the_other_precision(tmp_path):
    venv = Path(sys.executable).parent.parent

    def dry(**variables: str) -> list[str]:
        return subprocess.run(["make", "-n", "precisions", f"VENV={venv}", f"RUN={tmp_path}",
                               *(f"{k}={v}" for k, v in variables.items())],
                              cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()

    # reduced: both sides train N-step joint runs; only the other side in the other precision
    lines = dry(PRECISION_STEPS="9")
    host = next(i for i, l in enumerate(lines) if "RUN=" + str(tmp_path / "precision-host") in l)
    other = next(i for i, l in enumerate(lines) if "RUN=" + str(tmp_path / "precision-other") in l)
    assert not lines[host].startswith("PLANNER_LM_PRECISION=")
    assert lines[other].startswith("PLANNER_LM_PRECISION=bf16-mixed ")
    assert all("--trainer.max_steps 9" in lines[i] + lines[i + 1] for i in (host, other))
    links = [l for l in lines if "for d in" in l]
    assert any("3_planner" in l for l in links) and any("3_planner" not in l for l in links)
    # default: only the other side's planner, compared with the run's own full evaluation
    lines = dry()
    assert not any("precision-host" in l for l in lines)
    other = next(i for i, l in enumerate(lines) if "RUN=" + str(tmp_path / "precision-other") in l)
    assert lines[other].startswith("PLANNER_LM_PRECISION=bf16-mixed ")
    assert "precision-other/3_planner/manifest.json" in " ".join(lines[other:other + 3])
    compare = " ".join(l for l in lines if "--verdicts" in l or "precision-other --output" in l)
    assert f"--verdicts {tmp_path} " in compare


def test_make_long_has_every_lm_stage_on_sotu(tmp_path, capsys):
    stages = {}
    commands = stage_commands("long", tmp_path, LONG_RUN=str(tmp_path / "long"))  # not the checkout's runs/long
    for stage, args in commands:
        stages.setdefault(stage, resolved(stage, args, capsys))
    assert {"prepare", "pretrain_lm", "finetune_joint", "evaluate"} <= set(stages)
    assert stages["prepare"]["corpus"]["name"] == "sotu"
    assert stages["finetune_joint"]["trainer"]["max_steps"] == 120  # the demo's joint budget, not the paper's
    assert stages["pretrain_lm"]["trainer"]["max_steps"] == 150
    assert stages["evaluate"]["null_seed"] == 43  # the noise floor: fixed trained again with seed 43
    null = [resolved(s, a, capsys) for s, a in commands
            if s == "finetune_joint" and a[a.index("--run_dir") + 1].endswith("seed-43")]
    assert null and null[0]["model"]["selection"] == "fixed" and null[0]["seed_everything"] == 43
