"""Training stages under DDP (2 forked CPU processes on gloo) against one process.

`data.batch_size` is the global batch: two processes load half of it each and, through the
DistributedSampler that Lightning swaps in (seeded like our own sampler), see together the
examples one process sees; losses are means over the global batch. So after the same steps both
must hold the same weights: for LM pretraining, planner pretraining and joint fine-tuning with
every selection and the unfreeze schedules (whose held parameters DDP must keep synchronising).
(k-means has its own DDP test in test_kmeans.py.)
Tolerance: the two runs' weights differ by under 0.1 % of the size of the single run's update
(summation order and a few unequal token counts per process, nothing more); a process that
trained on its own half of the batch misses that by far (the control below).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from fixtures_stages import make_fake_upstream, write_fake_lm, write_fake_planner
from planner_lm.data.joint_data import JointDataModule
from planner_lm.lit.joint import JointPlannerLM
from planner_lm.models.selection import PLANNER_SELECTIONS

K, DIM, STEPS, GLOBAL_BATCH = 8, 16, 3, 4
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = make_fake_upstream(tmp_path_factory.mktemp("ddp"), num_docs=30, sentences_per_doc=(1, 8), dim=DIM, k=K)
    write_fake_lm(run)
    write_fake_planner(run, K, DIM, 4)
    return run


def joint(run_dir: Path, selection: str, batch_size: int, **model_kwargs) -> tuple[L.LightningModule, L.LightningDataModule]:
    data = JointDataModule(run_dir=str(run_dir), needs_planner=selection in PLANNER_SELECTIONS, window=24,
                           batch_size=batch_size, num_workers=0)
    data.prepare_data()
    data.setup("fit")
    torch.manual_seed(0)
    model = JointPlannerLM(selection=selection, lm_path=data.lm_path, codebook_path=data.codebook_path,
                           planner_path=data.planner_path, num_actions=data.num_actions,
                           embedding_dim=data.embedding_dim, conditioned_layers=[2, 3], lr=1e-3,
                           export_best=False, **model_kwargs)
    return model, data


def train(run_dir: Path, tmp_path: Path, selection: str, devices: int, batch_size: int = GLOBAL_BATCH,
          build=joint, **model_kwargs) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Weights before and after `STEPS` optimizer steps on `devices` processes."""
    L.seed_everything(0)
    model, data = build(run_dir, selection, batch_size, **model_kwargs)
    for module in model.modules():  # dropout draws differ between one and two processes
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        elif isinstance(module, nn.MultiheadAttention):
            module.dropout = 0.0
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp_fork" if devices > 1 else "auto",
                        max_steps=STEPS, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    if devices == 1:  # a forked run hands back its weights, not its loop state
        assert trainer.global_step == STEPS
    return before, {name: p.detach().clone() for name, p in model.named_parameters()}


def _without_key_bias(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Attention's key bias has no gradient in exact arithmetic (softmax ignores a shift shared by
    all keys), so Adam turns float noise into full-size steps there in any run: left out."""
    kept = dict(weights)
    for name, value in weights.items():
        if name.endswith("in_proj_bias"):
            third = value.shape[0] // 3
            kept[name] = torch.cat([value[:third], value[2 * third:]])
    return kept


def relative_gap(before: dict, single: dict, other: dict) -> float:
    """||other - single|| over ||single - before||, across the parameters the single run changed."""
    before, single, other = (_without_key_bias(w) for w in (before, single, other))
    moved = [name for name in single if not torch.equal(single[name], before[name])]
    assert moved, "the single-process run changed nothing"
    gap = torch.stack([(other[n] - single[n]).norm() for n in moved]).norm()
    update = torch.stack([(single[n] - before[n]).norm() for n in moved]).norm()
    return float(gap / update)


CASES = [
    ("soft", {}), ("hard", {}), ("straight_through", {}), ("oracle", {}), ("fixed", {}), ("uniform", {}),
    ("boundary", {}), ("none", {"base_mode": "full"}),
    ("soft", {"planner_unfreeze_at": 2, "codebook_unfreeze_at": 1}),
]


@pytest.mark.slow
@pytest.mark.parametrize("selection,settings", CASES, ids=[f"{s}-{'-'.join(map(str, k.values())) or 'default'}"
                                                           for s, k in CASES])
def test_two_processes_train_like_one_on_the_same_global_batch(run_dir, tmp_path, selection, settings):
    before, single = train(run_dir, tmp_path, selection, 1, **settings)
    _, ddp = train(run_dir, tmp_path, selection, 2, **settings)
    assert relative_gap(before, single, ddp) < TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("selection,settings", [("gumbel", {}), ("hard", {"planner_loss_weight": 0.5,
                                                                         "planner_unfreeze_at": 1})])
def test_ddp_trains_the_planner_where_one_process_differs_by_design(run_dir, tmp_path, selection, settings):
    """Only finishing and moving the planner is checked: Gumbel noise is drawn per process, and
    the planner loss is a mean over each batch's distinct target sentences, which two processes
    deduplicate separately (a sentence whose windows fall on both counts twice)."""
    before, after = train(run_dir, tmp_path, selection, 2, **settings)
    assert any(not torch.equal(after[n], before[n]) for n in before if n.startswith("planner."))


def test_ddp_soft_with_a_delayed_unfreeze_matches_one_process_and_half_a_batch_does_not(run_dir, tmp_path):
    """The fast guard: the hardest case (a held planner and codebook) and the control that the
    tolerance can fail (one process on half the global batch)."""
    settings = {"planner_unfreeze_at": 2, "codebook_unfreeze_at": 1}
    before, single = train(run_dir, tmp_path, "soft", 1, **settings)
    _, ddp = train(run_dir, tmp_path, "soft", 2, **settings)
    _, half = train(run_dir, tmp_path, "soft", 1, batch_size=GLOBAL_BATCH // 2, **settings)
    assert relative_gap(before, single, ddp) < TOLERANCE
    assert relative_gap(before, single, half) > 10 * TOLERANCE


def lm_pretraining(run_dir: Path, _: str, batch_size: int) -> tuple[L.LightningModule, L.LightningDataModule]:
    from planner_lm.data.lm_pretrain_data import LMPretrainDataModule
    from planner_lm.lit.lm_pretrain import CausalLMPretrainModule

    data = LMPretrainDataModule(str(run_dir), window=16, batch_size=batch_size, num_workers=0)
    torch.manual_seed(0)
    return CausalLMPretrainModule(n_layer=2, n_embd=32, n_head=2, n_positions=64, dropout=0.0, lr=1e-2,
                                  warmup_steps=1), data


def planner_pretraining(run_dir: Path, _: str, batch_size: int) -> tuple[L.LightningModule, L.LightningDataModule]:
    from planner_lm.data.planner_data import PlannerDataModule
    from planner_lm.lit.planner import PlannerModule

    data = PlannerDataModule(str(run_dir), context_sentences=4, batch_size=batch_size, seed=0, num_workers=0)
    torch.manual_seed(0)
    return PlannerModule(data.embedding_dim, data.num_actions, data.centroids, context_sentences=4, ffn_dim=16,
                         lr=1e-3, dropout=0.0), data


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain_lm", "pretrain_planner"])
def test_pretraining_stages_train_alike_on_one_and_two_processes(stage, run_dir, tmp_path):
    if stage == "pretrain_lm":  # enough text that 3 steps of 8 windows stay inside one epoch
        from planner_lm.corpus import CorpusConfig
        from planner_lm.pipeline.prepare import PrepareConfig, SplitConfig, prepare_corpus

        where = tmp_path / "lm_run"
        prepare_corpus(PrepareConfig(run_dir=str(where), corpus=CorpusConfig(name="demo", max_docs=40),
                                  split=SplitConfig(val_docs=2, test_docs=2), workers=1))
        build = lm_pretraining
    else:
        where, build = run_dir, planner_pretraining
    before, single = train(where, tmp_path, stage, 1, batch_size=8, build=build)
    _, ddp = train(where, tmp_path, stage, 2, batch_size=8, build=build)
    assert relative_gap(before, single, ddp) < TOLERANCE
