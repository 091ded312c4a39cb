"""Joint planner + LM fine-tuning: data, gradients per selection, unfreeze schedule, training."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from planner_lm.run_folder import stage_dir
from planner_lm.artifacts import write_manifest
from planner_lm.data.joint_data import JointDataModule
from planner_lm.errors import UserError
from planner_lm.lit.callbacks import resolve_unfreeze_step
from planner_lm.lit.joint import JointPlannerLM
from planner_lm.models.planner import Planner
from fixtures_stages import make_fake_upstream, write_fake_lm, write_fake_planner

K, DIM, CONTEXT = 8, 16, 4


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = make_fake_upstream(tmp_path_factory.mktemp("joint"), num_docs=30, sentences_per_doc=(1, 8), dim=DIM, k=K)
    write_fake_lm(run)
    write_fake_planner(run, K, DIM, CONTEXT)
    return run


@pytest.fixture(scope="module")
def data(run_dir) -> JointDataModule:
    return make_data(run_dir)


def make_data(run_dir: Path, needs_planner: bool = True, **kwargs) -> JointDataModule:
    data = JointDataModule(run_dir=str(run_dir), needs_planner=needs_planner, window=24,
                           batch_size=kwargs.pop("batch_size", 4), **kwargs)
    data.prepare_data()
    data.setup("fit")
    return data


def make_model(data: JointDataModule, selection: str, **kwargs) -> JointPlannerLM:
    torch.manual_seed(0)
    kwargs.setdefault("planner_path", data.planner_path)
    return JointPlannerLM(selection=selection, lm_path=data.lm_path,
                          codebook_path=data.codebook_path, num_actions=data.num_actions,
                          embedding_dim=data.embedding_dim, conditioned_layers=[2, 3], **kwargs)


def test_batch_runs_the_planner_once_per_distinct_target_sentence(run_dir):
    data = make_data(run_dir, batch_size=3)
    windows = data._windows["train"]
    items = [windows[i] for i in range(3)]
    batch = data.collate(items)
    targets = torch.stack([item["target_sentence"] for item in items])
    assert torch.equal(batch["plan_sentence"][batch["token_plan"]], targets)
    assert len(batch["plan_sentence"]) == len(torch.unique(targets))
    embeddings = np.load(data.embed_manifest.dir / "embeddings.npy")
    actions = np.load(data.cluster_manifest.dir / "actions.npy")
    assert (batch["plan_action"].numpy() == actions[batch["plan_sentence"].numpy()]).all()
    # the planner sees the sentences before its target in the same document, never the target
    for row, sentence in enumerate(batch["plan_sentence"].tolist()):
        first = int(data.prepared.sentence_doc_first[sentence])
        previous = list(range(max(first, sentence - CONTEXT), sentence))
        mask = batch["plan_context_mask"][row]
        assert mask.tolist() == [False] * (CONTEXT - len(previous)) + [True] * len(previous)
        assert torch.equal(batch["plan_context"][row][mask], torch.from_numpy(embeddings[previous].astype(np.float32)))


def planner_grad_norm(model: JointPlannerLM, batch) -> float:
    model.train()
    model.zero_grad()
    logits, _ = model(batch)
    from planner_lm.lit.losses import next_token_nll as token_nll

    nll, count = token_nll(logits, batch["labels"])
    (nll / count).backward()
    grads = [p.grad.norm() for p in model.planner.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


@pytest.mark.parametrize("selection,gets_gradient",
                         [("soft", True), ("straight_through", True), ("gumbel", True), ("hard", False)])
def test_lm_loss_reaches_the_planner_only_through_differentiable_selections(data, selection, gets_gradient):
    batch = next(iter(data.train_dataloader()))
    model = make_model(data, selection)
    norm = planner_grad_norm(model, batch)
    assert (norm > 0) == gets_gradient
    assert all(p.grad is not None for p in model.lm.adapter_parameters())


@pytest.mark.parametrize("selection", ["oracle", "fixed", "uniform"])
def test_oracle_and_content_free_selections_build_no_planner(data, selection):
    model = make_model(data, selection)
    assert model.planner is None and not model.uses_planner
    assert model.has_trainable_parameters()  # the adapters still train
    logits, planner_logits = model(next(iter(data.val_dataloader())))
    assert planner_logits is None and torch.isfinite(logits).all()


def test_any_supported_family_trains_jointly_llama(run_dir, tmp_path):
    lm = write_fake_lm(run_dir, "llama", out=tmp_path / "llama")
    data = make_data(run_dir, lm=str(lm))
    model = make_model(data, "soft")
    assert model.lm.config.model_type == "llama"
    assert planner_grad_norm(model, next(iter(data.train_dataloader()))) > 0


def test_none_is_the_base_lm_bit_for_bit_and_actions_change_the_output(data):
    batch = next(iter(data.val_dataloader()))
    plain = make_model(data, "none").eval()
    with torch.no_grad():
        base_logits = plain.lm.base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        none_logits, planner_logits = plain(batch)
        oracle = make_model(data, "oracle").eval()
        oracle_logits, _ = oracle(batch)
    assert planner_logits is None and plain.planner is None
    assert torch.equal(none_logits, base_logits)
    assert not torch.allclose(oracle_logits, base_logits)
    # `none` with frozen base weights has nothing to train: the stage evaluates the base LM
    assert not plain.has_trainable_parameters()


class RecordUpdates(L.Callback):
    """After each optimizer step: did the planner's and the codebook's weights change?"""

    def __init__(self):
        self.planner, self.codebook = [], []

    @staticmethod
    def _snapshot(pl_module):
        return ([p.detach().clone() for p in pl_module.planner.parameters()], pl_module.lm.codebook.detach().clone())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = self._snapshot(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        planner, codebook = self._snapshot(pl_module)
        self.planner.append(any(not torch.equal(a, b) for a, b in zip(planner, self._before[0])))
        self.codebook.append(not torch.equal(codebook, self._before[1]))


def fit(model, data, tmp_path, max_steps, callbacks=(), **trainer_kwargs):
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=list(callbacks),
                        default_root_dir=tmp_path, **trainer_kwargs)
    trainer.fit(model, datamodule=data)
    return trainer


def test_unfreeze_schedule_holds_weights_until_the_global_step(data, tmp_path):
    # planner at step 2 (an int), codebook at 60% of 5 steps = step 3 (a fraction)
    model = make_model(data, "soft", planner_unfreeze_at=2, codebook_unfreeze_at=0.6)
    record = RecordUpdates()
    fit(model, data, tmp_path, max_steps=5, callbacks=[record], limit_val_batches=0)
    assert record.planner == [False, False, True, True, True]
    assert record.codebook == [False, False, False, True, True]
    # held, not frozen: DDP keeps synchronising their gradients across the unfreeze
    assert all(p.requires_grad for p in model.planner.parameters()) and model.lm.codebook.requires_grad


def test_a_planner_no_loss_reaches_is_frozen_from_the_start(data):
    assert not any(p.requires_grad for p in make_model(data, "hard").planner.parameters())
    assert all(p.requires_grad for p in make_model(data, "hard", planner_loss_weight=0.5).planner.parameters())


def test_unfreeze_step_resolution():
    assert resolve_unfreeze_step(0, 100) == 0
    assert resolve_unfreeze_step(7, 100) == 7
    assert resolve_unfreeze_step(0.25, 100) == 25
    assert resolve_unfreeze_step(-1, 100) is None and resolve_unfreeze_step(-0.5, 100) is None
    with pytest.raises(UserError, match="fraction"):
        resolve_unfreeze_step(1.5, 100)


def test_joint_training_lowers_the_lm_loss_and_reports_planner_accuracy(run_dir, tmp_path):
    data = make_data(run_dir, batch_size=8)
    model = make_model(data, "soft", lr=3e-3, planner_loss_weight=0.5)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    before = trainer.validate(model, datamodule=data, verbose=False)[0]
    fit(model, data, tmp_path, max_steps=10, limit_val_batches=0)
    after = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
        model, datamodule=data, verbose=False)[0]
    assert after["val/ppl"] < before["val/ppl"]
    assert 0.0 <= after["val/planner_acc"] <= 1.0
    assert model.planner_acc_start is not None


def test_mismatched_number_of_actions_is_a_clear_error(tmp_path):
    run = make_fake_upstream(tmp_path, num_docs=6, dim=DIM, k=K)
    write_fake_lm(run)
    write_fake_planner(run, K + 1, DIM, CONTEXT)
    with pytest.raises(UserError, match="num_actions.*pretrain-planner"):
        JointDataModule(run_dir=str(run))
    # a selection without a planner does not care about the planner stage
    JointDataModule(run_dir=str(run), needs_planner=False)


def test_planner_of_an_older_kmeans_run_is_refused(tmp_path):
    """Same k, new k-means run: the planner's actions mean something else now."""
    run = make_fake_upstream(tmp_path, num_docs=6, dim=DIM, k=K)
    write_fake_lm(run)
    write_fake_planner(run, K, DIM, CONTEXT)
    JointDataModule(run_dir=str(run))  # built from the current cluster stage: accepted
    cluster = stage_dir(run, "cluster")
    recorded = json.loads((cluster / "manifest.json").read_text())
    write_manifest(cluster, stage="cluster", config={"rerun": True}, inputs={"embed": stage_dir(run, "embed")},
                   outputs=list(recorded["outputs"]), facts=recorded["facts"])
    with pytest.raises(UserError, match="pretrain-planner"):
        JointDataModule(run_dir=str(run))


def test_changed_tokenizer_is_a_clear_error(tmp_path):
    run = make_fake_upstream(tmp_path, num_docs=6, dim=DIM, k=K)
    lm = write_fake_lm(run)
    write_fake_planner(run, K, DIM, CONTEXT)
    manifest = json.loads((lm / "manifest.json").read_text())
    manifest["facts"]["tokenizer_fingerprint"] = "0" * 16
    (lm / "manifest.json").write_text(json.dumps(manifest))
    data = JointDataModule(run_dir=str(run))
    with pytest.raises(UserError, match="pretrain-lm"):
        data.prepare_data()


def run_stage(run_dir: Path, selection: str, *extra: str) -> dict:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stages"))
    from finetune_joint import run

    return run(["--run_dir", str(run_dir), "--model.selection", selection, "--model.conditioned_layers", "[2, 3]",
                "--data.window", "24", "--data.batch_size", "4", "--trainer.max_steps", "2",
                "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false", *extra])


def test_stage_saves_a_loadable_conditioned_lm_planner_and_manifest(run_dir, data):
    from planner_lm.lit.losses import next_token_nll as token_nll
    from planner_lm.models.conditioning import ActionConditionedLM

    manifest = run_stage(run_dir, "soft")  # validates on the first 2 validation batches
    out = run_dir / "4_joint-soft"
    assert manifest["facts"]["selection"] == "soft" and manifest["facts"]["num_actions"] == K
    assert manifest["facts"]["trained"] and manifest["metrics"]["steps"] == 2
    assert "val/planner_acc" in manifest["metrics"]
    assert (out / "planner" / "model.safetensors").is_file() and (out / "manifest.json").is_file()
    assert (out / "lm" / "tokenizer.json").is_file() or (out / "lm" / "vocab.json").is_file()
    # joint training updated the planner, not only the LM
    pretrained = Planner.from_pretrained(stage_dir(run_dir, "pretrain_planner")).state_dict()
    tuned = Planner.from_pretrained(out).eval()
    assert not all(torch.equal(tensor, pretrained[name]) for name, tensor in tuned.state_dict().items())
    # the saved LM and planner, without Lightning, give the manifest's perplexity: summed token
    # NLL over the same validation windows divided by their labelled tokens
    lm = ActionConditionedLM.from_pretrained(out / "lm").eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for batch, _ in zip(data.val_dataloader(), range(2)):
            weights = torch.softmax(tuned(batch["plan_context"], batch["plan_context_mask"]), -1)[batch["token_plan"]]
            nll, tokens = token_nll(lm(batch["input_ids"], batch["attention_mask"], action_weights=weights).logits,
                                    batch["labels"])
            total, count = total + nll.double(), count + int(tokens)
    # recomputed in fp32: exact when the stage ran in fp32 too, within bf16 rounding otherwise
    from planner_lm.hardware import fast_precision

    tolerance = 1e-6 if fast_precision() == "32-true" else 1e-3
    assert manifest["metrics"]["val/ppl"] == pytest.approx(float(torch.exp(total / count)), rel=tolerance)


def test_plain_lm_with_frozen_weights_is_evaluated_untouched(run_dir):
    manifest = run_stage(run_dir, "none")
    assert manifest["facts"]["trained"] is False and manifest["metrics"]["steps"] == 0
    assert "planner" not in manifest["outputs"]
    assert not (run_dir / "4_joint-none" / "planner").exists()


def test_best_validation_weights_are_handed_off(data):
    model = make_model(data, "soft")
    names = model._handed_off_names()
    assert any(n.startswith("planner.") for n in names) and any("adapter" in n for n in names)
    assert not any(n.startswith("lm.base.") and "adapter" not in n and "codebook" not in n for n in names)
    model.best.offer(0.5, 3, model, names, {"val/ppl": 1.65})
    kept = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    with torch.no_grad():
        for p in [*model.planner.parameters(), *model.lm.adapter_parameters()]:
            p.add_(1.0)
    assert model.select_export_weights() == (3, {"val/ppl": 1.65})
    for name, parameter in model.named_parameters():
        if name in kept:
            assert torch.equal(parameter, kept[name]), name
    # a worse validation is not kept; export_best=False hands off the final weights
    assert not model.best.offer(0.6, 4, model, names)
    final = make_model(data, "soft", export_best=False)
    final.best.offer(0.5, 3, final, names)
    assert final.select_export_weights() is None


def test_planner_dropout_is_off_in_joint_training_unless_asked(data, tmp_path):
    pretrained_with_dropout = str(Planner(embedding_dim=DIM, num_actions=K, context_sentences=CONTEXT, ffn_dim=32,
                                          dropout=0.3).save_pretrained(tmp_path / "planner"))

    def dropouts(**kwargs) -> set[float]:
        model = make_model(data, "soft", **{**kwargs, "planner_path": pretrained_with_dropout})
        return {m.p for m in model.planner.modules() if isinstance(m, torch.nn.Dropout)}

    assert dropouts() == {0.0}
    assert dropouts(planner_dropout=0.2) == {0.2}
    with pytest.raises(UserError, match="planner_dropout"):
        dropouts(planner_dropout=1.0)


def test_boundary_control_alternates_by_sentence_and_builds_no_planner(data):
    batch = next(iter(data.val_dataloader()))
    model = make_model(data, "boundary")
    assert model.planner is None
    weights, logits = model.action_weights(batch)
    assert logits is None
    expected = (batch["plan_sentence"] - torch.as_tensor(
        data.prepared.sentence_doc_first[batch["plan_sentence"].numpy()])) % 2
    assert torch.equal(weights.argmax(-1), expected[batch["token_plan"]])


def test_resume_checkpoints_leave_the_frozen_base_out_and_still_resume(tmp_path):
    """A frozen (here bf16) base is reloaded from the base LM, never written into checkpoints; a
    run that resumes from such a checkpoint hands off the same weights."""
    from planner_lm.models.base_lm import load_base_lm

    run = make_fake_upstream(tmp_path, num_docs=12, dim=DIM, k=K)
    write_fake_lm(run)
    write_fake_planner(run, K, DIM, CONTEXT)
    args = ("--model.base_mode", "frozen", "--model.base_dtype", "bfloat16", "--model.activation_checkpointing", "true")
    run_stage(run, "soft", *args)
    out = stage_dir(run, "finetune_joint", "soft")
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    base_params = {f"lm.base.{name}" for name, _ in load_base_lm(str(stage_dir(run, "pretrain_lm"))).named_parameters()}
    assert not base_params & set(checkpoint["state_dict"])
    assert any(".adapters." in key for key in checkpoint["state_dict"]) and any(
        key.startswith("planner.") for key in checkpoint["state_dict"])
    first = {k: v.clone() for k, v in Planner.from_pretrained(out).state_dict().items()}
    (out / "manifest.json").unlink()  # as if killed after the last checkpoint: the re-run resumes
    again = run_stage(run, "soft", *args)
    assert again["metrics"]["steps"] == 2
    for name, value in Planner.from_pretrained(out).state_dict().items():
        assert torch.equal(value, first[name]), name
