"""The run folder reader (one place knows every stage directory) and the layout rules it enables."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from fixtures_stages import ROOT, make_fake_upstream, write_fake_lm
from planner_lm.artifacts import write_manifest
from planner_lm.errors import UserError
from planner_lm.run_folder import JOINT_PREFIX, STAGE_DIRS, RunFolder, stage_dir

PACKAGE = ROOT / "planner_lm"


def fake_joint_run(run_dir: Path, selection: str, k: int = 8, finished: bool = True) -> Path:
    """A joint-run directory with just enough for the reader: an LM folder and (maybe) a manifest."""
    out = stage_dir(run_dir, "finetune_joint", selection)
    (out / "lm").mkdir(parents=True)
    if finished:
        write_manifest(out, stage="finetune_joint", config={"model.temperature": 0.5}, outputs=["lm"],
                       facts={"num_actions": k, "selection": selection})
    return out


def test_reader_hands_out_the_run_with_document_starts_from_the_prepared_splits(tmp_path):
    run_dir = make_fake_upstream(tmp_path, num_docs=20, k=5, dim=8)
    folder = RunFolder(run_dir)
    assert (folder.num_actions, folder.embedding_dim) == (5, 8)
    assert folder.embeddings().shape == (folder.prepared.num_sentences, 8)
    assert folder.codebook().dtype == np.float32 and folder.codebook().shape == (5, 8)
    assert len(folder.actions()) == folder.prepared.num_sentences
    # every sentence's document start, rebuilt here from the split tables alone
    expected = np.empty(folder.prepared.num_sentences, dtype=np.int64)
    for split in ("train", "val", "test"):
        for row in folder.prepared.split(split):
            first, count = row["first_sentence"], len(row["sent_start"])
            expected[first:first + count] = first
    assert (folder.doc_first == expected).all()
    assert folder.token_cache_dir.parent == run_dir / "tokens"


def test_joint_runs_come_in_table_order_and_unfinished_ones_are_skipped(tmp_path, capsys):
    run_dir = make_fake_upstream(tmp_path, num_docs=10, k=8)
    for selection in ("fixed", "none", "soft"):
        fake_joint_run(run_dir, selection)
    fake_joint_run(run_dir, "hard", finished=False)
    folder = RunFolder(run_dir)
    runs = folder.joint_runs()
    assert [r.selection for r in runs] == ["soft", "fixed", "none"]
    assert "skipping" in capsys.readouterr().out
    assert runs[0].planner_temperature == 0.5 and runs[0].planner_path is None
    assert folder.tokenizer_dir(runs[0]) == folder.dir("pretrain_lm")  # no tokenizer saved beside the LM
    with pytest.raises(UserError, match=r"finished: fixed, none, soft"):
        folder.joint_run("hard")
    with pytest.raises(UserError, match="no finished run for selection"):
        folder.joint_runs(["soft", "hard"])


def test_reader_refuses_a_joint_run_made_for_another_codebook(tmp_path):
    run_dir = make_fake_upstream(tmp_path, num_docs=10, k=8)
    fake_joint_run(run_dir, "soft", k=6)
    with pytest.raises(UserError, match="num_actions=6"):
        RunFolder(run_dir).joint_run("soft")


def test_reader_refuses_a_codebook_built_from_other_embeddings(tmp_path):
    run_dir = make_fake_upstream(tmp_path, num_docs=10)
    embed = stage_dir(run_dir, "embed")
    manifest = json.loads((embed / "manifest.json").read_text())
    manifest["created"] = "re-embedded later"  # a rebuilt embed stage: its manifest hash changes
    (embed / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="built from an older"):
        RunFolder(run_dir).cluster_manifest()


def test_the_tokenizer_saved_beside_a_joint_lm_wins(tmp_path):
    run_dir = make_fake_upstream(tmp_path, num_docs=10)
    write_fake_lm(run_dir, out=stage_dir(run_dir, "finetune_joint", "soft") / "lm")
    write_manifest(stage_dir(run_dir, "finetune_joint", "soft"), stage="finetune_joint", config={}, outputs=["lm"],
                   facts={"num_actions": 8})
    folder = RunFolder(run_dir)
    assert folder.tokenizer_dir(folder.joint_run("soft")) == stage_dir(run_dir, "finetune_joint", "soft") / "lm"


# ----------------------------------------------------------------------------- layout rules
def _code_strings(path: Path) -> list[str]:
    """String constants of a module, docstrings excluded."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and isinstance(node.value, str) and id(node) not in docstrings]


def test_only_the_run_folder_spells_stage_directory_names():
    """Paths are built from `planner_lm.run_folder` everywhere else (messages to people may name them:
    a string with spaces is prose, not a path)."""
    names = [*STAGE_DIRS.values(), JOINT_PREFIX, "embeddings.npy", "centroids.npy", "actions.npy"]
    offenders = sorted(f"{path.relative_to(ROOT)}: {text!r}" for path in PACKAGE.rglob("*.py")
                       if path.name != "run_folder.py"
                       for text in _code_strings(path)
                       if not any(c.isspace() for c in text) and any(name in text for name in names if len(name) > 2))
    assert offenders == []


def test_stage_scripts_are_thin_and_modules_hold_one_idea():
    assert {p.name: len(p.read_text().splitlines()) for p in (ROOT / "stages").glob("*.py")
            if len(p.read_text().splitlines()) > 25} == {}
    assert {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")
            if len(p.read_text().splitlines()) > 400} == {}


def test_evaluation_and_generation_never_reach_into_lightning_code():
    plain = [*(PACKAGE / "evaluation").glob("*.py"), *PACKAGE.glob("generation*.py"), PACKAGE / "sentence_vectors.py",
             PACKAGE / "run_folder.py", *(PACKAGE / "models").glob("*.py")]
    offenders = []
    for path in plain:
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{path.name}: {m}" for m in modules if m.startswith(("planner_lm.lit", "lightning"))]
    assert offenders == []
