"""The paper's shift, by behaviour: position t is conditioned on the sentence of token t+1.

A planted corpus makes the shift observable: every sentence is the word of its action
(`"red. gold. red. blue."`), actions are drawn independently, and the LM has a word-level
vocabulary. Only the code of the NEXT sentence tells which word follows a ".", so a model
conditioned on its own sentence (or on the sentence after next) cannot get below
`log(k)` nats on the word tokens, about half of all tokens.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import torch_threads
from fixtures_stages import ACTION_WORDS, load_stage, make_fake_upstream, word_tokenizer, write_fake_lm
from planner_lm.data.joint_data import JointDataModule
from planner_lm.pipeline.evaluate import EvaluateConfig, StructureConfig, evaluate_runs

K, DIM = 4, 16
WINDOW = 24
FLOOR = 0.5 * math.log(K)
"""Mean NLL per token of a model that does not know the next sentence's action (words are half the tokens)."""

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = make_fake_upstream(tmp_path_factory.mktemp("align"), num_docs=80, sentences_per_doc=(4, 12), dim=DIM, k=K,
                             planted=False, action_words=True)
    write_fake_lm(run, tokenizer=word_tokenizer(ACTION_WORDS[:K]))
    return run


@pytest.fixture(scope="module")
def oracle_manifest(run_dir) -> dict:
    """The oracle run of the real `finetune-joint` entry point (about 40 steps: seconds on one thread)."""
    with torch_threads(1):
        return load_stage("finetune_joint").run([
            "--run_dir", str(run_dir), "--model.selection", "oracle", "--model.conditioned_layers", "[2, 3]",
            "--model.base_mode", "full", "--model.lr", "1e-2", "--data.window", str(WINDOW), "--data.batch_size", "8",
            "--trainer.max_steps", "40", "--trainer.check_val_every_n_epoch", "1000",
            "--trainer.enable_progress_bar", "false"])


def test_each_position_carries_the_action_of_the_next_tokens_sentence(run_dir):
    """In training batches, the code before each word is that word's action (no model involved)."""
    data = JointDataModule(run_dir=str(run_dir), needs_planner=False, window=WINDOW, batch_size=16)
    data.prepare_data()
    data.setup("fit")
    word_action = {data.tokenizer.convert_tokens_to_ids(word): a for a, word in enumerate(ACTION_WORDS[:K])}
    checked = 0
    for batch in data.val_dataloader():
        action = batch["plan_action"][batch["token_plan"]]  # [B, T]: the code each position is given
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        for row in range(ids.shape[0]):
            for t in range(int(mask[row].sum()) - 1):
                following = int(ids[row, t + 1])
                if following in word_action:
                    assert int(action[row, t]) == word_action[following], (row, t)
                    checked += 1
    assert checked > 50


def test_oracle_training_learns_the_next_word_from_the_next_sentences_code(oracle_manifest):
    assert oracle_manifest["metrics"]["steps"] == 40
    assert oracle_manifest["metrics"]["val/lm_loss"] < FLOOR / 2, oracle_manifest["metrics"]


def test_evaluation_gives_each_token_the_code_of_the_next_tokens_sentence(run_dir, oracle_manifest):
    """The evaluate stage's scorer: true codes far below the floor, content-free codes above it."""
    config = EvaluateConfig(run_dir=str(run_dir), code_sources=["oracle", "fixed", "uniform", "none"], window=WINDOW,
                            stride=WINDOW // 2, batch_size=16, bootstrap_samples=20,
                            structure=StructureConfig(docs=0), device="cpu")
    rows = {row["source"]: row["nll"] for row in evaluate_runs(config)["rows"]}
    assert rows["oracle"] < FLOOR / 2, rows
    assert min(rows["fixed"], rows["uniform"], rows["none"]) > FLOOR * 0.9, rows
