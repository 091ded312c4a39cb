"""Benches keep what they measured (bench/_common.py) and refuse a missing run in one line, first."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from fixtures_stages import ROOT, make_fake_upstream
from planner_lm.errors import UserError

spec = importlib.util.spec_from_file_location("bench_common", ROOT / "bench" / "_common.py")
common = importlib.util.module_from_spec(spec)
spec.loader.exec_module(common)


def test_report_is_kept_as_it_grows_and_on_a_crash(tmp_path, capsys):
    path = tmp_path / "out" / "b.json"
    with pytest.raises(RuntimeError):
        with common.bench_report("b", path, host="x") as report:
            report["first"] = 1.5
            report.save()
            assert json.loads(path.read_text()) == {"bench": "b", "host": "x", "first": 1.5}
            raise RuntimeError("worker died")
    kept = json.loads(path.read_text())
    assert kept["first"] == 1.5 and kept["complete"] is False and "worker died" in kept["error"]
    assert json.loads(capsys.readouterr().out) == kept  # printed too
    with common.bench_report("b", path) as report:
        report["all"] = 2
    assert json.loads(path.read_text())["complete"] is True


def test_user_error_before_any_measurement_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        with common.bench_report("b", tmp_path / "b.json"):
            common.require_stages(tmp_path / "nothing", ["embed"], option="--datasets demo",
                                  instead="--datasets planted")
    assert stopped.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not (tmp_path / "b.json").exists()
    assert captured.err.count("\n") == 1 and "--datasets demo" in captured.err and "--datasets planted" in captured.err
    run_dir = make_fake_upstream(tmp_path, num_docs=10, k=4, dim=8)
    common.require_stages(run_dir, ["prepare", "embed", "cluster"], option="--run_dir x")
    with pytest.raises(UserError, match="pretrain_planner"):
        common.require_stages(run_dir, ["pretrain_planner"], option="--run_dir x")


def test_kmeans_bench_names_the_datasets_value_before_any_work(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_kmeans.py"), "--datasets",
                           f"planted,{tmp_path / 'missing'}", "--json", str(tmp_path / "k.json")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr
    assert "--datasets planted" in done.stderr and done.stderr.count("\n") == 1
    assert not (tmp_path / "k.json").exists()
