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
from precision import stage_autocast, stage_rel_tolerance

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


@pytest.mark.numeric
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
    with torch.no_grad(), stage_autocast():  # the stage's own precision (bf16 autocast on native-bf16 hosts)
        for batch, _ in zip(data.val_dataloader(), range(2)):
            weights = torch.softmax(tuned(batch["plan_context"], batch["plan_context_mask"]), -1)[batch["token_plan"]]
            nll, tokens = token_nll(lm(batch["input_ids"], batch["attention_mask"], action_weights=weights).logits,
                                    batch["labels"])
            total, count = total + nll.double(), count + int(tokens)
    assert manifest["metrics"]["val/ppl"] == pytest.approx(float(torch.exp(total / count)), rel=stage_rel_tolerance(1e-6))


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
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
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


def test_pred_trains_the_lm_on_the_frozen_planners_soft_weights(data):
    """The reference's PRED stage: soft weights of the pretrained planner, which never changes."""
    model = make_model(data, "pred")
    assert not any(p.requires_grad for p in model.planner.parameters())
    batch = next(iter(data.train_dataloader()))
    pretrained = Planner.from_pretrained(data.planner_path).eval()
    with torch.no_grad():
        expected = torch.softmax(pretrained(batch["plan_context"], batch["plan_context_mask"]), -1)[batch["token_plan"]]
    weights, _ = model.action_weights(batch)
    torch.testing.assert_close(weights, expected)  # fp32 on every host: no autocast here
    assert planner_grad_norm(model, batch) == 0.0
    assert all(p.grad is not None for p in model.lm.adapter_parameters())
    with pytest.raises(UserError, match="pred.*frozen"):
        make_model(data, "pred", planner_loss_weight=1.0)


@pytest.fixture(scope="module")
def pred_run(tmp_path_factory) -> Path:
    """A run directory with a finished 2-step `pred` run (the warm start's source)."""
    run = make_fake_upstream(tmp_path_factory.mktemp("warm"), num_docs=12, dim=DIM, k=K)
    write_fake_lm(run)
    write_fake_planner(run, K, DIM, CONTEXT)
    run_stage(run, "pred", "--model.lr", "1e-2")
    return run


def test_warm_start_begins_with_the_pred_runs_adapters_and_codebooks(pred_run):
    from safetensors.torch import load_file

    saved = load_file(str(stage_dir(pred_run, "finetune_joint", "pred") / "lm" / "conditioning.safetensors"))
    data = make_data(pred_run, init_from="pred")
    assert data.inputs["init"] == stage_dir(pred_run, "finetune_joint", "pred")
    warm = make_model(data, "soft", init_lm_path=data.init_lm_path)
    cold = make_model(data, "soft")
    for name, tensor in warm.lm.adapters.state_dict().items():
        assert torch.equal(tensor, saved[f"adapters.{name}"]), name
        assert not torch.equal(tensor, cold.lm.adapters.state_dict()[name]), name  # the pred run trained them
    assert torch.equal(warm.lm.codebook.detach(), saved["codebook"])
    assert not torch.equal(cold.lm.codebook.detach(), saved["codebook"])  # the pred run moved them


def test_warm_start_refuses_a_run_of_other_layers_or_another_base(pred_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from planner_lm.models.base_lm import load_base_lm
    from planner_lm.models.conditioning import ActionConditionedLM

    data = make_data(pred_run, init_from="pred")
    with pytest.raises(UserError, match="conditioned_layers"):
        JointPlannerLM(selection="soft", lm_path=data.lm_path, planner_path=data.planner_path,
                       codebook_path=data.codebook_path, num_actions=K, embedding_dim=DIM, conditioned_layers=[3],
                       init_lm_path=data.init_lm_path)
    base = load_base_lm(data.lm_path)
    torch.manual_seed(1)
    other = AutoModelForCausalLM.from_config(base.config)  # same shape, other weights
    codebook = torch.from_numpy(np.load(data.codebook_path))
    with pytest.raises(UserError, match="another base"):
        ActionConditionedLM(other, codebook, conditioned_layers=[2, 3]).warm_start(data.init_lm_path)
    with pytest.raises(UserError, match="not a finished joint run"):
        make_data(pred_run, init_from="hard")


def test_warm_started_stage_records_its_source(pred_run):
    """... and its total steps from its initialisation: its own 2 on top of pred's 2 (the budget the
    evaluation compares; a cold start's total is its own steps)."""
    manifest = run_stage(pred_run, "soft", "--data.init_from", "pred")
    assert manifest["facts"]["init_from"] == "pred"
    assert "init" in manifest["inputs"]
    pred = json.loads((stage_dir(pred_run, "finetune_joint", "pred") / "manifest.json").read_text())
    assert pred["facts"]["total_steps"] == pred["metrics"]["steps"] == 2
    assert manifest["facts"]["total_steps"] == manifest["metrics"]["steps"] + 2 == 4


def test_seed_everything_also_seeds_the_adapters(tmp_path, monkeypatch):
    """A joint run with another `--seed_everything` starts from other adapters, not only another data
    order (the noise floor's second `fixed` run must differ in both); the default seed 42 keeps
    adapter seed 0, the initialisation of every earlier run."""
    from planner_lm.models.conditioning import ActionConditionedLM
    from planner_lm.models.scale import build_conditioned_lm

    monkeypatch.setenv("PL_GLOBAL_SEED", "42")  # restored afterwards: the stage sets it for this process
    run = make_fake_upstream(tmp_path, num_docs=12, dim=DIM, k=K)
    write_fake_lm(run)
    run_stage(run, "fixed", "--seed_everything", "43", "--trainer.max_steps", "1")
    saved = json.loads((stage_dir(run, "finetune_joint", "fixed") / "lm" / "conditioning_config.json").read_text())
    assert saved["adapter_seed"] == 1
    codebook = torch.from_numpy(np.load(stage_dir(run, "cluster") / "centroids.npy"))
    built = {}
    for seed in ("42", "43"):
        monkeypatch.setenv("PL_GLOBAL_SEED", seed)
        built[seed] = build_conditioned_lm(str(stage_dir(run, "pretrain_lm")), codebook, "fixed", "frozen", [2, 3], True)
    assert built["42"].settings.adapter_seed == 0 and built["43"].settings.adapter_seed == 1
    reference = ActionConditionedLM(built["42"].base, codebook, conditioned_layers=[2, 3], adapter_seed=0)
    for name, tensor in built["42"].adapters.state_dict().items():
        assert torch.equal(tensor, reference.adapters.state_dict()[name]), name
        if name.endswith("weight"):  # biases start at zero whatever the seed
            assert not torch.equal(tensor, built["43"].adapters.state_dict()[name]), name


def test_runs_record_their_learning_curve_and_evaluation_tabulates_it_against_fixed(pred_run, tmp_path):
    from planner_lm.evaluation.curves import curve_markdown, plot_curves, val_curves
    from planner_lm.run_folder import RunFolder

    manifest = run_stage(pred_run, "fixed", "--trainer.val_check_interval", "1", "--trainer.max_steps", "3",
                         "--model.export_best", "false")
    folder = RunFolder(pred_run)
    fixed = folder.joint_run("fixed")
    curve = fixed.val_curve()
    assert [row["step"] for row in curve] == [1, 2, 3] and "val_curve.json" in manifest["outputs"]
    assert curve[-1]["val/ppl"] == pytest.approx(manifest["metrics"]["val/ppl"], rel=1e-5)
    # pred never validated inside fit (2 steps, one epoch-end validation): its final validation is its one point
    assert [row["step"] for row in folder.joint_run("pred").val_curve()] == [2]
    curves = val_curves(folder.joint_runs(["pred", "fixed"]))
    table = curve_markdown(curves)
    pred_at_2 = curves["pred"][2] / curves["fixed"][2] - 1
    assert f"| 2 | {curves['pred'][2]:.2f} ({pred_at_2:+.2%}) | {curves['fixed'][2]:.2f} |" in table
    assert "| 1 | – |" in table
    plot_curves(curves, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_a_resumed_run_reports_the_accuracy_of_the_planner_before_joint_training(tmp_path, monkeypatch):
    """The forgetting baseline is measured once, on the planner as it came in, and kept in the
    checkpoint: a run resumed after a crash must not measure the half-tuned planner instead."""
    import shutil

    run = make_fake_upstream(tmp_path, num_docs=40, dim=DIM, k=K)
    write_fake_lm(run)
    write_fake_planner(run, K, DIM, CONTEXT)
    other = tmp_path / "uninterrupted"
    shutil.copytree(run, other)
    # the planner loss makes the planner learn the planted rule fast, so its accuracy moves
    args = ("--trainer.max_steps", "6", "--checkpoint_every_n_steps", "2", "--model.planner_lr", "0.05",
            "--model.planner_loss_weight", "1.0", "--model.export_best", "false", "--trainer.limit_val_batches", "4")
    reference = run_stage(other, "soft", *args)["metrics"]
    assert reference["val/planner_acc"] != reference["val/planner_acc_start"]  # tuning moved the planner

    def crash(self, batch, batch_idx):
        if self.global_step == 5:
            raise RuntimeError("simulated crash")

    with monkeypatch.context() as patch:
        patch.setattr(JointPlannerLM, "on_train_batch_start", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_stage(run, "soft", *args)
    out = stage_dir(run, "finetune_joint", "soft")
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    resumed = run_stage(run, "soft", *args)["metrics"]
    assert resumed["val/planner_acc_start"] == reference["val/planner_acc_start"]
    assert resumed["val/planner_acc"] == pytest.approx(reference["val/planner_acc"])
