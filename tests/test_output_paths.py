"""Commands that take an output path replace only what planner-lm wrote there, or refuse in one line.

`compare --output FILE` (the tables `make demo SEEDS=N` and `make precisions` keep in the run),
`planner-lm-eval task RUN [OUT]` (a harness task folder) and `generate --output FILE`; `publish
--output` is in `tests/test_publish.py`. lm-evaluation-harness's own `--output_path` writes a new
time-stamped file each run, so it never replaces one.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from planner_lm.errors import UserError
from planner_lm.evaluation import compare
from planner_lm.ownership import owned_text


@pytest.fixture
def tables(monkeypatch) -> list[str]:
    """compare's table without evaluated runs: each call returns the next of these."""
    shown = ["| question | seed 42 |", "| question | seed 42 | seed 43 |"]
    monkeypatch.setattr(compare, "verdict_table", lambda run_dirs, labels: shown.pop(0))
    return shown


def test_compare_writes_a_new_file_and_replaces_only_its_own_unedited_table(tmp_path, tables, capsys):
    out = tmp_path / "seeds.md"
    assert compare.main(["--verdicts", str(tmp_path), "--output", str(out)]) == 0
    assert owned_text(out) and out.read_text().endswith("| question | seed 42 |\n")
    assert compare.main(["--verdicts", str(tmp_path), "--output", str(out)]) == 0  # its own: replaced
    assert out.read_text().endswith("| seed 43 |\n") and out.read_text().count("| question") == 1


@pytest.mark.parametrize("existing", ["a user's file", "an edited table", "a folder"])
def test_compare_refuses_an_output_it_did_not_write_and_leaves_it(tmp_path, tables, capsys, existing):
    out = tmp_path / "seeds.md"
    if existing == "a folder":
        out.mkdir()
    elif existing == "a user's file":
        out.write_text("my notes\n")
    else:
        assert compare.main(["--verdicts", str(tmp_path), "--output", str(out)]) == 0
        out.write_text(out.read_text() + "my note on the table\n")
    before = out.read_text() if out.is_file() else None
    assert compare.main(["--verdicts", str(tmp_path), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and str(out) in err and "not written by planner-lm" in err
    assert (out.read_text() if out.is_file() else None) == before


def test_the_harness_task_replaces_its_own_files_and_keeps_the_users(tmp_path):
    from planner_lm.harness import TEXT_TASK, write_text_task

    out = write_text_task(["first."], tmp_path / "harness")
    (out / "notes.md").write_text("mine")  # the user's file beside the task: kept
    write_text_task(["second."], out)
    assert '"second."' in (out / f"{TEXT_TASK}.jsonl").read_text() and (out / "notes.md").read_text() == "mine"

    users = tmp_path / "users"
    users.mkdir()
    (users / f"{TEXT_TASK}.jsonl").write_text("my data\n")
    with pytest.raises(UserError, match="did not write"):
        write_text_task(["third."], users)
    assert (users / f"{TEXT_TASK}.jsonl").read_text() == "my data\n"
    assert sorted(p.name for p in users.iterdir()) == [f"{TEXT_TASK}.jsonl"]


def test_generate_never_writes_over_an_existing_file(tmp_path):
    from planner_lm.pipeline.generate import GenerateConfig, generate_text

    out = tmp_path / "gen.json"
    out.write_text("[]\n")
    with pytest.raises(UserError, match="already exists"):  # before the run is even read
        generate_text(GenerateConfig(run_dir=str(tmp_path / "missing"), output=str(out)))
    assert out.read_text() == "[]\n"
