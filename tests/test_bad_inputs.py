"""Every bad input is one sentence and exit code 2, never a traceback, and never changes a finished stage.

Each row feeds one bad input through a real stage entry point (`stages/<name>.py`'s `main`, which
runs inside `planner_lm.errors.friendly_errors`) on a run whose upstream stages are finished, and
checks the single `error:` line, the exit code, and that every finished stage's files are untouched.
"""
from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from fixtures_stages import load_stage, make_fake_upstream, write_fake_lm, write_fake_planner

K, DIM = 8, 16
# imported here, outside any captured test: Lightning binds its log handler to the stderr of the moment
STAGES = {name: load_stage(name) for name in ("prepare", "embed", "finetune_joint")}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """prepare, embed, cluster, pretrain-lm and pretrain-planner finished (tiny, fake)."""
    run = make_fake_upstream(tmp_path_factory.mktemp("bad-inputs"), num_docs=20, dim=DIM, k=K)
    write_fake_lm(run)
    write_fake_planner(run, K, DIM)
    return run


def fingerprint(run: Path) -> dict[str, str]:
    """Every file of every finished stage (a folder with a manifest), by content."""
    stages = [manifest.parent for manifest in run.glob("*/manifest.json")]
    return {str(path.relative_to(run)): hashlib.sha256(path.read_bytes()).hexdigest()
            for stage in stages for path in stage.rglob("*") if path.is_file()}


def write(where: Path, name: str, content: bytes | str) -> str:
    path = where / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def parquet(where: Path, name: str, **columns) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), where / name)
    return str(where / name)


def corrupt_parquet(where: Path) -> str:
    good = Path(parquet(where, "good.parquet", text=["One sentence. Two sentences."] * 20))
    return write(where, "truncated.parquet", good.read_bytes()[: good.stat().st_size // 2])


def unreadable_jsonl(where: Path, monkeypatch) -> str:
    """Tests run as root, so no permission bit stops them: the read itself is refused."""
    path = write(where, "locked.jsonl", '{"text": "A sentence."}\n')
    real = Path.read_text

    def read_text(self, *args, **kwargs):
        if str(self) == path:
            raise PermissionError(13, "Permission denied", path)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    return path


def a_directory_named_like_a_file(where: Path) -> str:
    write(where, "corpus/a.jsonl", '{"text": "A sentence."}\n')
    (where / "corpus" / "b.jsonl").mkdir()  # the glob matches a directory where a file is expected
    return str(where / "corpus" / "*.jsonl")


def prepared_only(run: Path, where: Path) -> str:
    """A copy of the run with only 0_prepare/ finished. (A Lightning stage's folder is claimed before
    its model is built, so `--overwrite` on a finished stage would wipe it before a bad option is
    seen: that ordering belongs to `start_stage`, not to these inputs.)"""
    shutil.copytree(run / "0_prepare", where / "fresh" / "0_prepare")
    return str(where / "fresh")


def hub_unreachable(monkeypatch) -> None:
    """Online, with the network down (the suite blocks it; the client's error is what a user sees)."""
    import huggingface_hub

    def snapshot_download(repo_id, **kwargs):
        raise ConnectionError(f"Max retries exceeded with url: /api/models/{repo_id} (connection refused)")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, **kw: snapshot_download(repo_id))


PREPARE = ["--overwrite", "true", "--split.val_docs", "1", "--split.test_docs", "1", "--workers", "1",
           "--corpus.name"]  # --overwrite: even then a bad corpus must not cost the finished 0_prepare/
JOINT = ["--data.batch_size", "2", "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false"]

# (case, stage, arguments after --run_dir RUN given a scratch folder and monkeypatch, words the one line must hold)
CASES: list[tuple[str, str, Callable[[Path, pytest.MonkeyPatch], list[str]], str]] = [
    ("parquet of random bytes", "prepare", lambda d, m: [*PREPARE, write(d, "noise.parquet", b"\x00\x01 not parquet")],
     "is not a readable parquet file"),
    ("truncated parquet", "prepare", lambda d, m: [*PREPARE, corrupt_parquet(d)], "is not a readable parquet file"),
    ("parquet text column of numbers", "prepare", lambda d, m: [*PREPARE, parquet(d, "n.parquet", text=[1, 2, 3])],
     "column 'text' must hold text"),
    ("parquet without the text column", "prepare", lambda d, m: [*PREPARE, parquet(d, "b.parquet", body=["x"])],
     "has no column 'text'"),
    ("invalid JSON", "prepare", lambda d, m: [*PREPARE, write(d, "bad.json", '[{"text": "a"},')], "is not valid JSON"),
    ("invalid JSON line", "prepare", lambda d, m: [*PREPARE, write(d, "bad.jsonl", '{"text": "a"}\n{"text": \n')],
     "bad.jsonl:2 is not valid JSON"),
    ("JSON that is a number", "prepare", lambda d, m: [*PREPARE, write(d, "n.json", "42")], "must hold a JSON list"),
    ("JSON line that is a list", "prepare", lambda d, m: [*PREPARE, write(d, "l.jsonl", '["a"]\n')],
     "each line must be a JSON object"),
    ("text field holding a number", "prepare", lambda d, m: [*PREPARE, write(d, "n.jsonl", '{"text": 3}\n')],
     "field 'text' must hold text, found int"),
    ("text field holding a list", "prepare", lambda d, m: [*PREPARE, write(d, "l2.jsonl", '{"text": ["a"]}\n')],
     "field 'text' must hold text, found list"),
    ("records without the text field", "prepare", lambda d, m: [*PREPARE, write(d, "t.jsonl", '{"body": "a"}\n')],
     "has no 'text' field"),
    ("not UTF-8", "prepare", lambda d, m: [*PREPARE, write(d, "latin.txt", "café".encode("latin-1"))],
     "is not valid UTF-8"),
    ("unreadable file", "prepare", lambda d, m: [*PREPARE, unreadable_jsonl(d, m)], "Permission denied"),
    ("a directory where a file is expected", "prepare", lambda d, m: [*PREPARE, a_directory_named_like_a_file(d)],
     "Is a directory"),
    ("unsupported file type", "prepare", lambda d, m: [*PREPARE, write(d, "table.csv", "text\na\n")],
     "unsupported file type '.csv'"),
    ("a missing path", "prepare", lambda d, m: [*PREPARE, str(d / "nope.jsonl")], "does not exist"),
    ("a Hub dataset while offline", "prepare", lambda d, m: [*PREPARE, "someone/no-such-dataset"],
     "could not load the Hugging Face dataset"),
    ("a selection typo", "finetune_joint", lambda d, m: ["--model.selection", "sotf", *JOINT],
     "unknown selection 'sotf'"),
    ("a base LM path that does not exist", "finetune_joint", lambda d, m: ["--data.lm", "./models/gpt2", *JOINT],
     "is not a local folder (no such directory"),
    ("a base LM that is neither local nor cached, offline", "finetune_joint",
     lambda d, m: ["--data.lm", "models/gpt2", *JOINT], "HF_HUB_OFFLINE=1"),
    ("a base LM while the Hub is unreachable", "finetune_joint",
     lambda d, m: (hub_unreachable(m), ["--data.lm", "models/gpt2", *JOINT])[1], "could not download base LM"),
    ("an encoder path that does not exist", "embed", lambda d, m: ["--model.encoder", "~/no/such/encoder"],
     "not a local folder (no such directory"),
    ("an encoder while the Hub is unreachable", "embed",
     lambda d, m: (hub_unreachable(m), ["--model.encoder", "someone/encoder"])[1], "could not download sentence encoder"),
]


@pytest.mark.parametrize("case, stage, arguments, says", CASES, ids=[case for case, *_ in CASES])
def test_a_bad_input_is_one_line_exit_2_and_changes_no_finished_stage(case, stage, arguments, says, finished_run,
                                                                      tmp_path, monkeypatch, capsys):
    before = fingerprint(finished_run)
    args = ["--run_dir", str(finished_run), *arguments(tmp_path, monkeypatch)]
    if stage == "embed":  # a run whose embed stage has not run yet (see prepared_only)
        args += ["--run_dir", prepared_only(finished_run, tmp_path)]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        STAGES[stage].main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err and [line for line in lines if line.startswith("error:")] == lines[-1:], err
    assert says in lines[-1], lines[-1]
    assert fingerprint(finished_run) == before  # no finished stage changed
    assert not (finished_run / "4_joint-sotf").exists()  # a typo leaves no folder behind
