"""Training loaders that resume mid-epoch, on one process and as DDP's processes (`planner_lm.data.resumable`).

The DDP stage test (tests/test_ddp_stage.py, slow) checks the same through torchrun; these check
the batch arithmetic itself, on plain integers."""
from __future__ import annotations

import pytest
from torch.utils.data import DistributedSampler

from planner_lm.data.resumable import resumable_train_loader
from planner_lm.errors import UserError

N, GLOBAL_BATCH, SEED = 40, 8, 3


def batches(loader, epoch: int = 0) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)
    return [batch.tolist() for batch in loader]


def test_the_processes_of_a_ddp_run_together_load_what_one_process_would():
    one = batches(resumable_train_loader(list(range(N)), GLOBAL_BATCH, SEED), epoch=1)
    ranks = [resumable_train_loader(list(range(N)), GLOBAL_BATCH, SEED, process=(r, 2)) for r in (0, 1)]
    assert all(isinstance(loader.sampler, DistributedSampler) for loader in ranks)  # so Lightning keeps it
    shares = [batches(loader, epoch=1) for loader in ranks]
    assert [sorted(a + b) for a, b in zip(*shares)] == [sorted(batch) for batch in one]
    assert one != batches(resumable_train_loader(list(range(N)), GLOBAL_BATCH, SEED), epoch=2)  # epoch reshuffles


@pytest.mark.parametrize("process", [(0, 1), (0, 2), (1, 2)])
def test_a_restored_loader_continues_mid_epoch_with_the_next_batch(process):
    uninterrupted = batches(resumable_train_loader(list(range(N)), GLOBAL_BATCH, SEED, process=process), epoch=1)
    interrupted = resumable_train_loader(list(range(N)), GLOBAL_BATCH, SEED, process=process)
    interrupted.sampler.set_epoch(1)
    seen = iter(interrupted)
    head = [next(seen).tolist() for _ in range(2)]
    state = interrupted.state_dict()
    assert state == {"batches_done": 2}

    restored = resumable_train_loader(list(range(N)), GLOBAL_BATCH, SEED, process=process)
    restored.load_state_dict(state)
    assert head + batches(restored, epoch=1) == uninterrupted
    assert batches(restored, epoch=1) == uninterrupted  # the skip applies to one pass only


def test_a_global_batch_that_the_processes_cannot_share_evenly_is_refused():
    with pytest.raises(UserError, match="multiple of the number of processes"):
        resumable_train_loader(list(range(N)), 9, SEED, process=(0, 2))
