"""Conditioned LMs on large bases: building one in the base's own dtype, activation
checkpointing, FSDP sharding (FSDP2 `fully_shard`, through Lightning's `ModelParallelStrategy`)
and gathering a full, unsharded copy for the hand-off. Plain torch.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from planner_lm import seeding
from planner_lm.errors import UserError
from planner_lm.models.base_lm import load_base_lm
from planner_lm.models.conditioning import ActionConditionedLM


def build_conditioned_lm(
    lm_path: str, codebook: Tensor, selection: str, base_mode: str, conditioned_layers: list[int] | None,
    per_layer_codebook: bool, lora_r: int = 8, lora_alpha: int = 32, adapter_site: str = "attention_output",
    base_dtype: str | None = None, activation_checkpointing: bool = False, conditioning: str = "paper",
    residual_rank: int = 0, adapter_seed: int | None = None,
) -> ActionConditionedLM:
    """Load the base LM (in `base_dtype`, e.g. a frozen bf16 base) and wrap it with fp32 action adapters.

    For the plain-LM selection (`none`) the adapters and codebook are frozen and never see an
    action, so the model is the base LM bit for bit and only the base weights (lora / full) train.
    With `activation_checkpointing` each block's activations are recomputed in backward. The
    adapters are initialised from `adapter_seed`, by default the run's (`seeding.adapter_seed`).
    """
    if base_dtype is not None and base_mode != "frozen":
        raise UserError(f"--model.base_dtype {base_dtype} needs base_mode frozen: trained weights stay float32")
    if base_dtype not in (None, "float32", "bfloat16", "float16"):
        raise UserError(f"--model.base_dtype must be float32, bfloat16 or float16, got {base_dtype!r}")
    lm = ActionConditionedLM(
        load_base_lm(lm_path, dtype=base_dtype), codebook, conditioned_layers=conditioned_layers,
        per_layer_codebook=per_layer_codebook, base_mode=base_mode, lora_r=lora_r, lora_alpha=lora_alpha,
        adapter_site=adapter_site, conditioning=conditioning, residual_rank=residual_rank,
        adapter_seed=seeding.adapter_seed() if adapter_seed is None else adapter_seed,
    )
    if selection == "none":
        for parameter in [*lm.adapter_parameters(), *lm.codebook_parameters()]:
            parameter.requires_grad_(False)
    if activation_checkpointing:
        lm.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return lm


def shard(lm: ActionConditionedLM, planner: nn.Module | None, mesh) -> None:
    """FSDP over `mesh`: every base block is one unit, the rest of the conditioned LM (embeddings,
    head, adapters, codebooks: all used inside its forward) another, the planner a third."""
    from torch.distributed.fsdp import fully_shard

    for block in lm.blocks():
        fully_shard(block, mesh=mesh)
    fully_shard(lm, mesh=mesh)
    if planner is not None:
        fully_shard(planner, mesh=mesh)


def full_copy(module: nn.Module, rebuild: Callable[[], nn.Module]) -> nn.Module | None:
    """An unsharded copy of a sharded `module` with all its weights, on rank 0 (None elsewhere).

    Every rank must call it: the full state dict is gathered collectively (to the CPU), then rank 0
    loads it into `rebuild()`, a fresh module of the same shape.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if torch.distributed.get_rank() != 0:
        return None
    copy = rebuild()
    copy.load_state_dict(state)
    return copy
