"""Benches keep what they measured (bench/_common.py) and refuse a missing run in one line, first."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import torch_threads
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


def run_bench(name: str, argv: list[str], monkeypatch) -> None:
    """Run bench/<name>.py's `main` in this process (no second torch import) with `argv`."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    monkeypatch.setattr(sys, "argv", [name, *argv])
    module_spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    with torch_threads(1):
        module.main()


def test_joint_bench_reports_cpu_flags_and_every_round(tmp_path, monkeypatch, capsys):
    from planner_lm.hardware import cpu_flags

    path = tmp_path / "joint.json"
    run_bench("bench_joint", ["--steps", "2", "--batch-size", "1", "--window", "16", "--n-layer", "3", "--n-embd", "32",
                              "--num-actions", "4", "--embedding-dim", "8", "--context-sentences", "2",
                              "--tokens-per-sentence", "5", "--threads", "1", "--json", str(path)], monkeypatch)
    report = json.loads(path.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert report["complete"] is True and report["cpu_flags"] == cpu_flags()
    assert report["planner_calls_per_batch"] == {"per_sentence": 4, "per_token": 16}
    assert {v: len(s) for v, s in report["step_s_rounds"].items()} == {
        "lm_only": 2, "joint_per_sentence": 2, "joint_per_token": 2}
    assert set(report["median_step_s"]) == set(report["step_s_rounds"])


def test_eval_bench_checks_its_sentences_before_scoring(tmp_path, monkeypatch, capsys):
    path = tmp_path / "eval.json"
    with pytest.raises(SystemExit) as stopped:  # scoring would come first; the missing corpus stops it
        run_bench("bench_eval", ["--corpus", str(tmp_path / "missing.txt"), "--threads", "1", "--json", str(path)],
                  monkeypatch)
    assert stopped.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "missing.txt" in captured.err
    assert not path.exists()


def test_eval_bench_keeps_its_scoring_figures(tmp_path, monkeypatch, capsys):
    path = tmp_path / "eval.json"
    run_bench("bench_eval", ["--layers", "3", "--width", "32", "--lengths", "20,40", "--bucket_tokens", "40",
                             "--window", "16", "--stride", "15", "--batch_size", "4", "--repeats", "1",
                             "--skip_encode", "--device", "cpu", "--threads", "1", "--json", str(path)], monkeypatch)
    report = json.loads(path.read_text())
    assert json.loads(capsys.readouterr().out) == report and report["complete"] is True
    assert [row["doc_tokens"] for row in report["scoring"]["by_length"]] == [20, 40]
    assert report["scoring"]["tokens"] == 2 * 19 + 39  # every target of two 20-token and one 40-token document
    # fp32 (--precision 32): our scorer without actions gives the plain forward's numbers
    assert report["scoring"]["none_vs_plain_max_abs_token_nll_diff"] < 1e-4
    assert "encoding" not in report


def test_frozen_vs_plain_bench_times_both_steps_in_the_hosts_precision(tmp_path, monkeypatch, capsys):
    from planner_lm.hardware import fast_precision

    path = tmp_path / "frozen.json"
    run_bench("bench_joint", ["--mode", "frozen_vs_plain", "--shape", "demo", "--steps", "1", "--batch-size", "1",
                              "--window", "16", "--num-actions", "4", "--embedding-dim", "8", "--context-sentences", "2",
                              "--tokens-per-sentence", "5", "--threads", "1", "--json", str(path)], monkeypatch)
    report = json.loads(path.read_text())
    assert json.loads(capsys.readouterr().out) == report and report["complete"] is True
    assert report["precision"] == fast_precision()  # what the stages would train in here
    assert {v: len(s) for v, s in report["step_s_rounds"].items()} == {
        "plain_forward_backward": 1, "frozen_joint_step": 1}
    rounds = report["step_s_rounds"]  # one round: each variant's median is its only time
    assert report["frozen_joint_over_plain"] == pytest.approx(
        rounds["frozen_joint_step"][0] / rounds["plain_forward_backward"][0], rel=5e-3)
