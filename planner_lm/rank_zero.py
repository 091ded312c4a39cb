"""Decisions made once, by global rank 0, and used by every process: the one mechanism of every stage.

Preparing, replacing or cleaning a stage folder and choosing the checkpoint to resume from must
happen on one process only: two processes deleting the folder, or one picking a `last.ckpt` that
the other is deleting as stale, crash one rank and hang the rest, or silently restart a run.
When rank 0 refuses (a `UserError`) or fails before the work starts, every rank raises the same
error at once, so each prints the same `error:` line and exits: none waits at a barrier for a
process-group timeout. How rank 0's answer reaches the others depends on who started them:

- torchrun, srun, mpirun or a plain launch with `RANK`/`WORLD_SIZE`/`MASTER_ADDR`/`MASTER_PORT`
  (every process starts at once): rank 0's answer, or its error, is broadcast over the process
  group (`shared_decision`; Lightning stages open it first with the backend and timeout Lightning
  would use, and Lightning reuses it in `fit`; evaluate opens its own);
- Lightning itself (`ddp` re-runs the script inside `fit`, `ddp_fork`/`ddp_spawn` fork there):
  rank 0 decides before the others exist and leaves its answer in its environment, which the
  re-run scripts inherit (forked processes never ask).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

from planner_lm.errors import UserError

_ENV_PREFIX = "PLANNER_LM_RANK0_"


def _env_name(key: str) -> str:
    return _ENV_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:16]


def _open_process_group(strategy: Any) -> None:
    """Initialise torch.distributed the way the strategy would in `fit` (which then reuses it)."""
    import torch.distributed as dist
    from lightning.fabric.utilities.distributed import _init_dist_connection

    if dist.is_initialized():
        return
    strategy.accelerator.setup_device(strategy.root_device)
    backend = strategy._get_process_group_backend() if hasattr(strategy, "_get_process_group_backend") else (
        "nccl" if strategy.root_device.type == "cuda" else "gloo")
    kwargs = {"timeout": strategy._timeout} if getattr(strategy, "_timeout", None) is not None else {}
    _init_dist_connection(strategy.cluster_environment, backend, **kwargs)


def shared_decision(decide: Callable[[], Any], rank: int, world: int) -> Any:
    """Run `decide()` on rank 0 of the open process group; every rank returns its (picklable) result
    or raises its error: a `UserError` as itself, anything else as `RuntimeError("rank 0 failed: ...")`."""
    if world == 1:
        return decide()
    import torch.distributed as dist

    answer: list[Any] = [None]
    error: BaseException | None = None
    if rank == 0:
        try:
            answer[0] = {"value": decide()}
        except BaseException as err:  # noqa: BLE001 - shared with the others, then raised here
            error = err
            answer[0] = {"error": str(err), "user": isinstance(err, UserError)}
    dist.broadcast_object_list(answer, src=0)
    if error is not None:
        raise error
    if "error" in answer[0]:
        message = answer[0]["error"]
        raise UserError(message) if answer[0]["user"] else RuntimeError(f"rank 0 failed: {message}")
    return answer[0]["value"]


def decided_on_rank_zero(trainer: Any, key: str, decide: Callable[[], Any]) -> Any:
    """Run `decide()` on global rank 0 only; every process returns its (JSON-able) result.

    `key` names the decision (e.g. the stage folder and what is decided); an error raised by
    `decide` on rank 0 is raised on every rank.
    """
    from lightning.fabric.plugins.environments import LightningEnvironment

    strategy, rank = trainer.strategy, trainer.global_rank
    if trainer.world_size == 1:
        return decide()
    environment = strategy.cluster_environment
    if not environment.creates_processes_externally:  # Lightning starts the others later, from here
        if rank != 0:
            raise UserError("multi-node runs must be started by torchrun or srun (every process at once); "
                            "Lightning's own launcher cannot share rank 0's decisions across nodes")
        value = decide()
        os.environ[_env_name(key)] = json.dumps(value)
        return value
    found = os.environ.get(_env_name(key))
    if isinstance(environment, LightningEnvironment) and found is not None:  # re-run by rank 0's launcher
        return json.loads(found)
    _open_process_group(strategy)  # every process started at once (torchrun, srun, a plain launch)
    return shared_decision(decide, rank, trainer.world_size)
