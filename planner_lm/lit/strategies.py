"""`--trainer.strategy fsdp2`: FSDP2 over every process, for large bases in finetune-joint.

Lightning's `ModelParallelStrategy` lays processes out as data parallel × tensor parallel and, left
on "auto", makes every GPU of a node a tensor-parallel rank. This project shards by data only
(`JointPlannerLM.configure_model` applies `fully_shard` per base block), so data parallel is the
whole world and every process reads its own share of the global batch. Registered when this
module is imported (the joint stage does); works on GPUs (nccl) and CPUs (gloo).
"""
from __future__ import annotations

from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry

NAME = "fsdp2"


class ShardedDataParallel(ModelParallelStrategy):
    """ModelParallelStrategy with data parallelism over all processes and no tensor parallelism.

    Args:
        save_distributed_checkpoint: resume checkpoints as one directory of shards (True) or one
            file gathered on rank 0 (False, the default: the project's resume logic expects a file).
    """

    def __init__(self, save_distributed_checkpoint: bool = False, process_group_backend: str | None = None) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.world_size
        super().setup_environment()


if NAME not in StrategyRegistry:
    StrategyRegistry.register(NAME, ShardedDataParallel, description="FSDP2 over every process (planner-lm)")
