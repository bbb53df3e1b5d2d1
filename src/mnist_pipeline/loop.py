"""The training loop on whole-dataset tensors: no DataLoader, no per-image Python work.

The data live as one normalised float32 tensor on the training device; each epoch draws a
seeded permutation and slices batches by index. `train_one_epoch` and `validate` return
metrics and neither print nor log; `fit` runs the epochs and reports through a callback.
With several processes (`distributed.World`), each rank trains on its slice of every batch
under DistributedDataParallel and the epoch's metrics are reduced over the ranks.
"""

from __future__ import annotations

import copy
import functools
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .augment import random_affine
from .distributed import SINGLE, World, rank_seed, shard, sync_batchnorm, wrap
from .ema import WeightEMA
from .inference import predict_logits
from .model import MnistCNN
from .optim import BatchScheduler, Plateau, build_optimizer, build_schedulers
from .params import TrainParams
from .runtime import autocast, tune_cpu_allocator

EpochCallback = Callable[[int, dict[str, float]], None]


def to_tensor(
    images: np.ndarray, mean: float, std: float, device: torch.device, channels_last: bool = False
) -> torch.Tensor:
    """uint8 (N, 28, 28) -> normalised float32 (N, 1, 28, 28) on `device`."""
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).to(device)  # a writable copy
    x = (x.unsqueeze(1).float() / 255.0 - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@dataclass
class TrainState:
    """Everything that a resumed run needs to continue exactly where it stopped."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Plateau | None  # stepped once per epoch
    generator: torch.Generator
    epoch: int = 0  # epochs completed
    history: list[dict[str, float]] = field(default_factory=list)
    batch_scheduler: BatchScheduler | None = None  # stepped per batch
    ema: WeightEMA | None = None
    best: dict[str, Any] | None = None  # {"epoch", "val_accuracy", "state"} with select_best
    # With several ranks, each rank's own draws for augmentation (seeded by seed and rank);
    # the shuffling `generator` stays the same on every rank. None: `generator` draws both.
    augment_generator: torch.Generator | None = None

    def eval_model(self) -> nn.Module:
        """The network to evaluate and export: the weight average when there is one."""
        return self.ema.module if self.ema is not None else self.model


def build_state(params: TrainParams, device: torch.device, steps_per_epoch: int = 600,
                world: World = SINGLE) -> TrainState:
    """A freshly initialised model, optimizer, schedulers, EMA and generators (the same on
    every rank, but for each rank's augmentation generator)."""
    torch.manual_seed(params.seed)
    model = sync_batchnorm(MnistCNN().to(device), world, device)
    if params.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(params, model)
    scheduler, batch_scheduler = build_schedulers(params, optimizer, steps_per_epoch)
    ema = WeightEMA(model, params.ema_decay) if params.ema_decay > 0 else None
    generator = torch.Generator().manual_seed(params.seed)
    augment_generator = (torch.Generator().manual_seed(rank_seed(params.seed, world.rank))
                         if world.size > 1 else None)
    return TrainState(model, optimizer, scheduler, generator, batch_scheduler=batch_scheduler,
                      ema=ema, augment_generator=augment_generator)


def train_one_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
    batch_size: int, generator: torch.Generator, amp: str = "none",
    on_step: Callable[[], None] | None = None, step_fn: Callable | None = None, *,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    label_smoothing: float = 0.0, batch_scheduler: BatchScheduler | None = None,
    ema: WeightEMA | None = None, world: World = SINGLE,
) -> dict[str, float]:
    """One pass over (x, y) in seeded random batches of `batch_size` images over all ranks
    (a short last batch is dropped); with several ranks, the metrics are of all of them."""
    model.train()
    device = x.device
    order = torch.randperm(len(x), generator=generator).to(device)
    steps = len(x) // batch_size
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    loss = loss_sum
    for i in range(steps):
        idx = shard(order, i, batch_size, world)
        xb, yb = x[idx], y[idx]
        if augment is not None:
            xb = augment(xb)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            logits = (step_fn if step_fn is not None else model)(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=label_smoothing)
        loss.backward()
        optimizer.step()
        if batch_scheduler is not None:
            batch_scheduler.step()
        if ema is not None:
            ema.update()
        # accumulate on the device: no host sync per step
        loss_sum += loss.detach()
        correct += (logits.detach().argmax(1) == yb).sum()
        if on_step is not None:
            on_step()
    if world.backend is not None:
        totals = world.sum_(torch.stack([t.detach().double()
                                         for t in (loss_sum, loss, correct)]))
        return {
            "train_loss": totals[0].item() / max(world.size * steps, 1),
            "last_batch_loss": totals[1].item() / world.size,
            "train_accuracy": totals[2].item() / max(steps * batch_size, 1),
        }
    return {
        "train_loss": loss_sum.item() / max(steps, 1),
        "last_batch_loss": loss.item(),
        "train_accuracy": correct.item() / max(steps * batch_size, 1),
    }


def validate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, amp: str = "none",
    tta: bool = False,
) -> dict[str, float]:
    """Mean cross-entropy and accuracy (a fraction in [0, 1]) over the whole of (x, y)."""
    logits = predict_logits(model, x, batch_size, amp, tta)
    return {
        "loss": F.cross_entropy(logits, y).item(),
        "accuracy": (logits.argmax(1) == y).float().mean().item(),
    }


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def stops_early(history: list[dict[str, float]], patience: int) -> bool:
    """True when the last `patience` epochs of `history` brought no lower val_loss than the
    best epoch before them (never with patience 0)."""
    if patience == 0 or len(history) <= patience:
        return False
    losses = [row["val_loss"] for row in history]
    return min(losses[-patience:]) >= min(losses[:-patience])


def _step_function(state: TrainState, params: TrainParams, device: torch.device,
                   world: World = SINGLE) -> Callable | None:
    """What computes a batch's logits in training: compiled, fused, or the model itself;
    under DistributedDataParallel when there are several ranks."""
    if params.compile:
        return torch.compile(state.model)
    used = fused.status(params, device, state.model)
    if fused.is_fallback(used):  # (the one warning: `status` itself does not warn)
        why = used.removeprefix("off (").removesuffix(")")
        warnings.warn(f"fused CPU kernels not used ({why}); training with the eager modules "
                      "(same results up to rounding)", RuntimeWarning, stacklevel=3)
    fused_on = used == "on"
    if world.backend is not None:
        return wrap(fused.FusedForward(state.model) if fused_on else state.model, world,
                    device)
    if fused_on:
        return functools.partial(fused.forward, state.model)
    return None


def fit(
    state: TrainState, params: TrainParams, x: torch.Tensor, y: torch.Tensor,
    on_epoch_end: EpochCallback | None = None, on_step: Callable[[], None] | None = None,
    val: tuple[torch.Tensor, torch.Tensor] | None = None, world: World = SINGLE,
) -> list[dict[str, float]]:
    """Train from state.epoch + 1 to params.epochs; return the whole per-epoch history.

    With a validation split `val`, each epoch also reports val_loss and val_accuracy (of the
    network that would be exported), `select_best` keeps the best epoch in state.best and
    `early_stop_patience` ends training early (see `stops_early`; also when resumed). With
    several ranks, rank 0 validates and every rank gets its scores, so that all of them
    step the scheduler and stop alike.
    """
    if x.device.type == "cpu":
        tune_cpu_allocator()  # bit-identical, faster: no page faults for each step's tensors
    step_fn = _step_function(state, params, x.device, world)
    augment = None
    if params.augment:
        draws = state.augment_generator or state.generator

        def augment(xb: torch.Tensor) -> torch.Tensor:
            return random_affine(xb, draws, params.augment_shift, params.augment_rotate,
                                 params.augment_scale)
    for epoch in range(state.epoch + 1, params.epochs + 1):
        if stops_early(state.history, params.early_stop_patience):
            break
        start = time.perf_counter()
        metrics = train_one_epoch(
            state.model, state.optimizer, x, y, params.batch_size, state.generator,
            params.amp, on_step, step_fn, augment=augment,
            label_smoothing=params.label_smoothing, batch_scheduler=state.batch_scheduler,
            ema=state.ema, world=world,
        )
        if val is not None:
            metrics.update(world.broadcast(
                _validate_epoch(state, params, epoch, val) if world.is_main else None))
        if state.scheduler is not None:
            key = {"last_batch": "last_batch_loss", "epoch_mean": "train_loss",
                   "val_loss": "val_loss"}[params.plateau_loss]
            state.scheduler.step(metrics[key])
        metrics["lr"] = current_lr(state.optimizer)
        metrics["epoch_seconds"] = time.perf_counter() - start
        state.epoch = epoch
        state.history.append({"epoch": epoch, **metrics})
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)
    return state.history


def _validate_epoch(state: TrainState, params: TrainParams, epoch: int,
                    val: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """val_loss and val_accuracy of the exported network; keeps the best epoch if asked."""
    scores = validate(state.eval_model(), *val, params.eval_batch_size, params.amp)
    if params.select_best and (state.best is None
                               or scores["accuracy"] > state.best["val_accuracy"]):
        state.best = {"epoch": epoch, "val_accuracy": scores["accuracy"], "state": {
            k: v.detach().clone() for k, v in state.eval_model().state_dict().items()}}
    return {"val_loss": scores["loss"], "val_accuracy": scores["accuracy"]}


def final_model(state: TrainState) -> nn.Module:
    """The trained network to export: the best epoch's when one was kept."""
    net = state.eval_model()
    if state.best is None:
        return net
    best = copy.deepcopy(net)
    best.load_state_dict(state.best["state"])
    return best
