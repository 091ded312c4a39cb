"""`pretrain-lm`: packed windows, and the real stage entry point on a tiny prepared corpus."""

from pathlib import Path

import numpy as np
import pytest
import torch

from planner_lm.data.lm_pretrain_data import PackedWindows
from planner_lm.data.lm_windows import TokenizedSplit
from planner_lm.errors import UserError
from precision import stage_autocast, stage_rel_tolerance


@pytest.fixture(autouse=True)
def stages_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "stages"))


def fake_tokens(lengths):
    ids = np.arange(sum(lengths), dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenizedSplit(ids, np.zeros_like(ids, dtype=np.int64), offsets,
                          np.zeros(len(lengths), np.int64), "fake")


def test_packed_windows_label_every_token_once_without_padding():
    tokens = fake_tokens([5, 9, 3, 14])  # 31 tokens
    windows = PackedWindows(tokens, window=8)
    assert len(windows) == 30 // 7
    labelled = []
    for i in range(len(windows)):
        item = windows[i]
        assert item["attention_mask"].all() and len(item["input_ids"]) == 8
        labels = item["labels"][1:]  # position t predicts labels[t + 1]
        labelled.extend(labels[labels != -100].tolist())
    assert labelled == list(range(1, 1 + len(labelled)))  # contiguous, no repeats, no gaps


def tiny_args(run_dir, *extra):
    return [
        "--run_dir", str(run_dir),
        "--model.n_layer", "2", "--model.n_embd", "32", "--model.n_head", "2",
        "--model.n_positions", "64", "--model.lr", "1e-2", "--model.warmup_steps", "2",
        "--model.dropout", "0.0",
        "--data.window", "16", "--data.batch_size", "4",
        "--trainer.max_steps", "20", "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "5",
        "--trainer.check_val_every_n_epoch", "100",
        *extra,
    ]


def mean_nll(model, run_dir, split, window=16):
    from planner_lm.data.lm_pretrain_data import LMPretrainDataModule, collate_lm
    from planner_lm.data.lm_windows import LMWindows
    from planner_lm.lit.losses import next_token_nll

    data = LMPretrainDataModule(str(run_dir), window=window)
    windows = LMWindows(data._tokens(split), window, pad_token_id=data.pad_token_id)
    batch = collate_lm([windows[i] for i in range(len(windows))])
    with torch.no_grad(), stage_autocast():  # the stage's own precision (bf16 autocast on native-bf16 hosts)
        total, count = next_token_nll(model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                      batch["labels"])
    return float(total / count)


@pytest.mark.numeric
def test_stage_trains_and_hands_off_a_standard_hf_directory(tiny_prepared):
    from transformers import GPT2LMHeadModel

    from planner_lm.artifacts import read_manifest
    from planner_lm.models.base_lm import load_base_lm
    from planner_lm.tokenization import load_tokenizer, tokenizer_fingerprint
    from pretrain_lm import run

    manifest = run(tiny_args(tiny_prepared))
    out = tiny_prepared / "lm"
    facts = read_manifest(out, "pretrain_lm").facts
    assert facts["model_type"] == "gpt2" and facts["vocab_size"] == 50257
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["outputs"])
    assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "tb").is_dir()

    # what later stages do: load by directory, same tokenizer
    tokenizer = load_tokenizer(str(out))
    assert tokenizer_fingerprint(tokenizer) == facts["tokenizer_fingerprint"]
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    trained = load_base_lm(str(out)).eval()

    # training lowered the loss: compare with the same architecture untrained
    torch.manual_seed(0)
    untrained = GPT2LMHeadModel(trained.config).eval()
    nll = {(name, split): mean_nll(model, tiny_prepared, split)
           for name, model in (("trained", trained), ("untrained", untrained)) for split in ("train", "val")}
    assert nll["trained", "train"] < nll["untrained", "train"] - 3.0  # it learned its data
    assert nll["trained", "val"] < nll["untrained", "val"] - 0.5  # and something that transfers
    assert manifest["metrics"]["val/ppl"] == pytest.approx(np.exp(nll["trained", "val"]), rel=stage_rel_tolerance(1e-3))
    assert manifest["metrics"]["steps"] == 20


def test_window_longer_than_positions_is_refused(tiny_prepared):
    from pretrain_lm import run

    with pytest.raises(UserError, match="n_positions"):
        run(tiny_args(tiny_prepared, "--data.window", "128"))


def test_missing_prepare_names_the_target(tmp_path):
    from pretrain_lm import run

    with pytest.raises(UserError, match="make prepare|prepare"):
        run(["--run_dir", str(tmp_path / "nothing"), "--trainer.max_steps", "1"])
