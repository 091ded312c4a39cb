"""Joint training's set-up before the first step: the optimiser and its schedule, and the residual
conditioning's optional hidden-state start. Kept beside `lit/joint.py` so that module holds the steps."""
from __future__ import annotations

from typing import Any

import torch

from planner_lm.lit.schedules import SCHEDULES


def joint_optimizers(module: Any) -> Any:
    """Adam over the LM's shared weights (`lr`), the code-dependent weights (`residual_lr`,
    `residual_weight_decay`) and the planner (`planner_lr`), with `lr_schedule` when asked."""
    # Parameters held still by an unfreeze schedule are included: Adam skips them while
    # their gradient is None (the schedule drops it before each step).
    h = module.hparams
    lm = module.trainable_lm_parameters()
    shared = {id(p) for p in module.lm.shared_shift_parameters()}
    code = {id(p) for p in [*module.lm.adapter_parameters(), *module.lm.codebook_parameters()]} - shared
    residual_lr = h.lr if h.residual_lr is None else h.residual_lr
    residual_decay = h.weight_decay if h.residual_weight_decay is None else h.residual_weight_decay
    groups: list[dict[str, Any]] = [
        {"params": [p for p in lm if id(p) not in code], "lr": h.lr, "weight_decay": h.weight_decay, "name": "lm"},
        {"params": [p for p in lm if id(p) in code], "lr": residual_lr, "weight_decay": residual_decay,
         "name": "codes"},
    ]
    if module.planner is not None:
        planner_lr = h.lr if h.planner_lr is None else h.planner_lr
        groups.append({"params": list(module.planner.parameters()), "lr": planner_lr,
                       "weight_decay": h.weight_decay, "name": "planner"})
    groups = [group for group in groups if group["params"]]
    optimizer = torch.optim.Adam(groups, lr=h.lr)
    if SCHEDULES[h.lr_schedule] is None:
        return optimizer
    scheduler = SCHEDULES[h.lr_schedule](module, optimizer, h.warmup_steps, h.min_lr_ratio)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@torch.no_grad()
def initialise_residual(module: Any) -> None:
    """`residual_init hidden_states`: fit each residual adapter to the base's own per-action directions."""
    h = module.hparams
    if h.residual_init != "hidden_states" or module.global_step > 0 or h.init_lm_path or module.selection == "none":
        return  # a resumed or warm-started run keeps the weights it has
    from planner_lm.models.steering import SiteMeans, fit_residual

    means = SiteMeans(module.lm)
    was_training = module.lm.training
    module.lm.eval()  # the LM's own states, without dropout noise
    with means.collecting(), module.trainer.precision_plugin.forward_context():
        for index, batch in enumerate(module.trainer.datamodule.ordered_train_loader()):
            if index == h.residual_init_batches:
                break
            batch = {k: v.to(module.device) for k, v in batch.items()}
            actions = batch["plan_action"][batch["token_plan"]]
            means.observe(torch.where(batch["attention_mask"].bool(), actions, torch.full_like(actions, -1)))
            module.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      action_weights=None)  # the base's own states: the residual is still zero
    module.lm.train(was_training)
    directions, counts = means.directions()
    fit_residual(module.lm, directions, counts, h.residual_init_scale)
    module.log("train/residual_init_tokens", float(counts.sum()))


@torch.no_grad()
def measure_planner_start(module: Any) -> None:
    """The planner's validation accuracy before joint training: the forgetting baseline."""
    if module.planner is None or module.planner_acc_start is not None:
        return
    loader = module.trainer.datamodule.val_dataloader() if module.trainer.datamodule else None
    if loader is None:
        return
    was_training = module.planner.training
    module.planner.eval()
    correct = torch.zeros((), device=module.device)
    total = torch.zeros((), device=module.device)
    for batch in loader:
        logits = module.planner(batch["plan_context"].to(module.device), batch["plan_context_mask"].to(module.device))
        correct += (logits.argmax(-1) == batch["plan_action"].to(module.device)).sum()
        total += batch["plan_action"].numel()
    correct = module.trainer.strategy.reduce(correct, reduce_op="sum")
    total = module.trainer.strategy.reduce(total, reduce_op="sum")
    module.planner.train(was_training)
    module.planner_acc_start = float(correct / total.clamp(min=1))
    module.log("val/planner_acc_start", module.planner_acc_start)
