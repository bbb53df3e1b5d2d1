"""The optimizer and learning-rate schedules that the `train` params name."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .params import TrainParams

Plateau = torch.optim.lr_scheduler.ReduceLROnPlateau
BatchScheduler = torch.optim.lr_scheduler.LRScheduler


def build_optimizer(params: TrainParams, model: nn.Module) -> torch.optim.Optimizer:
    """Adam, AdamW or Nesterov SGD over the model's parameters (fused where asked for)."""
    options: dict[str, Any] = {"lr": params.lr, "weight_decay": params.weight_decay}
    if params.fused_optimizer and params.optimizer != "sgd":
        options["fused"] = True
    if params.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), **options)
    if params.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), **options)
    return torch.optim.SGD(model.parameters(), momentum=0.9, nesterov=True, **options)


def onecycle_warmup(pct: float, total: int) -> float:
    """OneCycleLR's pct_start for `pct` of `total` steps. Its warm-up ends at step
    pct * total - 1, and it divides by that: a warm-up of exactly one step (a run of a few
    steps) becomes none (`pct` of half a step), as OneCycleLR does with any shorter one."""
    return 0.5 / total if pct * total == 1 else pct


def build_schedulers(params: TrainParams, optimizer: torch.optim.Optimizer,
                     steps_per_epoch: int) -> tuple[Plateau | None, BatchScheduler | None]:
    """(stepped once per epoch: ReduceLROnPlateau, stepped per batch: OneCycle or cosine)."""
    if params.scheduler == "plateau":
        return Plateau(optimizer, mode="min", factor=params.plateau_factor,
                       threshold=params.plateau_threshold,
                       patience=params.plateau_patience), None
    total = max(params.epochs * steps_per_epoch, 1)
    if params.scheduler == "onecycle":
        return None, torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=params.lr, total_steps=total,
            pct_start=onecycle_warmup(params.onecycle_pct, total))
    if params.scheduler == "cosine":
        return None, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return None, None
