"""The front door: `planner-lm <command>` (console script, `python -m planner_lm`, the Makefile) and
`planner-lm-eval` (lm-evaluation-harness's own command line with our model registered)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import import_module

import numpy as np
import pytest

from fixtures_stages import ROOT, make_fake_upstream
from planner_lm.commands import COMMANDS, main
from planner_lm.run_folder import stage_dir

tomllib = pytest.importorskip("tomllib")  # Python 3.11+: reads pyproject.toml

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
NOISE = ("LeafSpec", "weights_only", "TPU available", "Tip:", "Traceback")


def resolve(spec: str):
    module, _, name = spec.partition(":")
    return getattr(import_module(module), name)


def planner_lm(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`planner-lm ARGS` as a user runs it: the venv's installed script when `pip install -e .` made
    one, else what that script does (import the entry point named in pyproject.toml and call it).
    PYTHONPATH puts this checkout first either way."""
    script = shutil.which("planner-lm", path=os.path.dirname(sys.executable))
    module, _, function = PYPROJECT["scripts"]["planner-lm"].partition(":")
    command = [script] if script else \
        [sys.executable, "-c", f"import sys; from {module} import {function}; sys.exit({function}())"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*command, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_console_scripts_and_lm_eval_plugin_resolve_to_the_commands():
    scripts = PYPROJECT["scripts"]
    assert resolve(scripts["planner-lm"]) is main
    assert callable(resolve(scripts["planner-lm-eval"]))
    pytest.importorskip("lm_eval")
    from lm_eval.api.model import LM

    plugin = resolve(PYPROJECT["entry-points"]["lm_eval.models"]["planner-lm"])
    assert issubclass(plugin, LM)


def test_every_stage_script_is_a_command_and_resolves():
    stages = {path.stem.replace("_", "-") for path in (ROOT / "stages").glob("*.py")}
    assert stages and stages <= set(COMMANDS)
    for name, spec in COMMANDS.items():
        assert callable(resolve(spec.target)), name
    # the Makefile runs each stage through the same command
    makefile = (ROOT / "Makefile").read_text()
    for stage in stages:
        assert f"$(PY) -m planner_lm {stage} " in makefile, stage
    assert "$(PY) stages/" not in makefile


def test_help_lists_every_command_with_one_line_each():
    for done in (planner_lm("--help", timeout=60),
                 subprocess.run([sys.executable, "-m", "planner_lm", "--help"], cwd=ROOT, capture_output=True,
                                text=True, timeout=60)):
        assert done.returncode == 0, done.stderr
        lines = {line.split()[0]: line for line in done.stdout.splitlines() if line.startswith("  ")}
        assert list(lines) == list(COMMANDS)
        assert all(len(line.split()) > 3 for line in lines.values())


def test_a_stage_shows_its_own_help(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["pretrain-planner", "--help"])
    assert stopped.value.code == 0
    printed = capsys.readouterr().out
    assert "--model.num_layers" in printed and "--data.context_sentences" in printed and "--run_dir" in printed
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    assert "--corpus.name" in capsys.readouterr().out


def test_unknown_command_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["pretrain-planer"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "pretrain-planner" in error


def test_a_stage_runs_from_the_command_with_a_config_file_and_prints_no_upstream_noise(tmp_path):
    """`planner-lm cluster --config FILE ...` in its own process: the stage's outputs, a user error
    as one line, and stderr free of the deprecation and checkpoint chatter of upstream libraries."""
    run_dir = make_fake_upstream(tmp_path, num_docs=40, k=4, dim=8)
    shutil.rmtree(run_dir / "2_cluster")
    config = tmp_path / "cluster.yaml"
    config.write_text("model:\n  num_clusters: 4\ndata:\n  batch_size: 64\ntrainer:\n  max_epochs: 3\n"
                      "  enable_progress_bar: false\n")
    done = planner_lm("cluster", "--config", str(config), "--run_dir", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((stage_dir(run_dir, "cluster") / "manifest.json").read_text())
    assert manifest["facts"]["num_actions"] == 4 and manifest["config"]["trainer.max_epochs"] == 3
    assert np.load(stage_dir(run_dir, "cluster") / "centroids.npy").shape == (4, 8)
    assert not [word for word in NOISE if word in done.stderr], done.stderr
    missing = planner_lm("pretrain-planner", "--run_dir", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr
    assert missing.stderr.strip().splitlines()[-1].startswith("error: ") and "does not exist" in missing.stderr


def test_training_stages_run_one_epoch_when_nothing_bounds_them(tmp_path):
    """Without --config (and without max_steps) a training stage trains one epoch, not Lightning's 1,000;
    the epochs it ran with are what its manifest records."""
    from planner_lm.cli import build_cli
    from planner_lm.pipeline.pretrain_planner import SPEC

    run_dir = make_fake_upstream(tmp_path, num_docs=12, k=4, dim=8)
    cli = build_cli(SPEC, ["--run_dir", str(run_dir), "--model.ffn_dim", "16"])
    assert cli.trainer.max_epochs == 1 and cli.config_dict["trainer.max_epochs"] == 1
    bounded = build_cli(SPEC, ["--run_dir", str(run_dir), "--model.ffn_dim", "16", "--trainer.max_steps", "5"])
    assert bounded.trainer.max_steps == 5 and bounded.trainer.max_epochs != 1
