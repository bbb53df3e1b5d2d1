"""Training on whole-dataset tensors: no DataLoader, no per-image Python work.

The data live as one normalised float32 tensor on the training device; each epoch draws a
seeded permutation and slices batches by index. `train_one_epoch` and `evaluate` return
metrics and neither print nor log; `fit` runs the epochs and reports through a callback.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.deterministic
from torch import nn

from . import fused
from .allocator import tune_cpu_allocator
from .augment import random_affine, shifted_views
from .model import MnistCNN
from .params import TrainParams

EpochCallback = Callable[[int, dict[str, float]], None]


def select_device(requested: str = "auto") -> torch.device:
    """'auto' picks CUDA when a GPU is present, else the CPU; otherwise the named device."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        from .errors import PipelineError

        raise PipelineError(f"device {requested!r} was asked for, but no CUDA GPU is available")
    return device


def configure_determinism(device: torch.device, cuda_deterministic: bool) -> str:
    """Make results repeatable where the device allows it; return the mode for the record."""
    if device.type == "cuda" and not cuda_deterministic:
        torch.backends.cudnn.benchmark = True
        torch.use_deterministic_algorithms(False)
        return "nondeterministic"
    if device.type == "cuda":
        # cuBLAS needs this workspace setting for deterministic GEMMs (set before first use).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)
    # Deterministic mode also fills every new tensor with NaN, a debugging aid that cost
    # 5-15% of a CPU training step (bench/RESULTS.md); no kernel reads unwritten memory, so
    # the results are bit-identical without it.
    torch.utils.deterministic.fill_uninitialized_memory = False
    return "deterministic"


def to_tensor(
    images: np.ndarray, mean: float, std: float, device: torch.device, channels_last: bool = False
) -> torch.Tensor:
    """uint8 (N, 28, 28) -> normalised float32 (N, 1, 28, 28) on `device`."""
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).to(device)  # a writable copy
    x = (x.unsqueeze(1).float() / 255.0 - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def fused_kernels_status(params: TrainParams, device: torch.device) -> str:
    """'on' if training runs the fused CPU kernels (`fused`; built on the first call), else
    'off' or 'unavailable' with the reason: for the run's record."""
    if not params.fused_kernels:
        return "off"
    for excluded, why in ((device.type != "cpu", device.type), (params.amp != "none", "amp"),
                          (params.compile, "compile"),
                          (not params.channels_last, "needs channels_last")):
        if excluded:
            return f"off ({why})"
    return "on" if fused.extension() is not None else f"unavailable ({fused.unavailable_reason()})"


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class WeightEMA:
    """An exponential moving average of a model's weights and buffers (BN statistics too),
    updated in place with one fused call per step. The decay warms up as (1 + n) / (10 + n)
    so that the average follows the fast early changes instead of the random init."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values(),
                         strict=True))
        self._float = [(a, b) for a, b in pairs if a.is_floating_point()]
        self._other = [(a, b) for a, b in pairs if not a.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        dst, src = zip(*self._float, strict=True)
        torch._foreach_lerp_(list(dst), list(src), 1.0 - decay)
        for a, b in self._other:  # e.g. BatchNorm's num_batches_tracked
            a.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


@dataclass
class TrainState:
    """Everything that a resumed run needs to continue exactly where it stopped."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau | None  # stepped once per epoch
    generator: torch.Generator
    epoch: int = 0  # epochs completed
    history: list[dict[str, float]] = field(default_factory=list)
    batch_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None  # stepped per batch
    ema: WeightEMA | None = None
    best: dict[str, Any] | None = None  # {"epoch", "val_accuracy", "state"} with select_best

    def eval_model(self) -> nn.Module:
        """The network to evaluate and export: the weight average when there is one."""
        return self.ema.module if self.ema is not None else self.model


def build_state(params: TrainParams, device: torch.device, steps_per_epoch: int = 600
                ) -> TrainState:
    """A freshly initialised model, optimizer, schedulers, EMA and shuffling generator."""
    torch.manual_seed(params.seed)
    model = MnistCNN().to(device)
    if params.channels_last:
        model = model.to(memory_format=torch.channels_last)
    options: dict[str, Any] = {"lr": params.lr, "weight_decay": params.weight_decay}
    if params.fused_optimizer and params.optimizer != "sgd":
        options["fused"] = True
    if params.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), **options)
    elif params.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), **options)
    else:
        optimizer = torch.optim.SGD(model.parameters(), momentum=0.9, nesterov=True, **options)
    scheduler = None
    if params.scheduler == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=params.plateau_factor,
            threshold=params.plateau_threshold, patience=params.plateau_patience,
        )
    batch_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    total = max(params.epochs * steps_per_epoch, 1)
    if params.scheduler == "onecycle":
        batch_scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=params.lr, total_steps=total, pct_start=params.onecycle_pct)
    elif params.scheduler == "cosine":
        batch_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    ema = WeightEMA(model, params.ema_decay) if params.ema_decay > 0 else None
    generator = torch.Generator().manual_seed(params.seed)
    return TrainState(model, optimizer, scheduler, generator, batch_scheduler=batch_scheduler,
                      ema=ema)


def train_one_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
    batch_size: int, generator: torch.Generator, amp: str = "none",
    on_step: Callable[[], None] | None = None, step_fn: Callable | None = None, *,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    label_smoothing: float = 0.0,
    batch_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ema: WeightEMA | None = None,
) -> dict[str, float]:
    """One pass over (x, y) in seeded random batches (a short last batch is dropped)."""
    model.train()
    device = x.device
    order = torch.randperm(len(x), generator=generator).to(device)
    steps = len(x) // batch_size
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    loss = loss_sum
    for i in range(steps):
        idx = order[i * batch_size : (i + 1) * batch_size]
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
    return {
        "train_loss": loss_sum.item() / max(steps, 1),
        "last_batch_loss": loss.item(),
        "train_accuracy": correct.item() / max(steps * batch_size, 1),
    }


@torch.no_grad()
def predict_logits(
    model: nn.Module, x: torch.Tensor, batch_size: int, amp: str = "none", tta: bool = False
) -> torch.Tensor:
    """Logits (N, 10) for every row of x, in eval mode, as float32. With `tta`, the log of
    the probabilities averaged over 1-pixel-shifted views (as the served model computes)."""
    model.eval()

    def one(xb: torch.Tensor) -> torch.Tensor:
        if not tta:
            return model(xb).float()
        probs = torch.stack([torch.softmax(model(v).float(), 1) for v in shifted_views(xb)])
        return probs.mean(0).clamp_min(1e-12).log()

    with autocast(x.device, amp):
        chunks = [one(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat(chunks) if chunks else torch.empty(0, 10, device=x.device)


def evaluate(
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


def fit(
    state: TrainState, params: TrainParams, x: torch.Tensor, y: torch.Tensor,
    on_epoch_end: EpochCallback | None = None, on_step: Callable[[], None] | None = None,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[dict[str, float]]:
    """Train from state.epoch + 1 to params.epochs; return the whole per-epoch history.

    With a validation split `val`, each epoch also reports val_loss and val_accuracy (of the
    network that would be exported), `select_best` keeps the best epoch in state.best and
    `early_stop_patience` ends training early (see `stops_early`; also when resumed).
    """
    if x.device.type == "cpu":
        tune_cpu_allocator()  # bit-identical, faster: no page faults for each step's tensors
    step_fn: Callable | None = None
    if params.compile:
        step_fn = torch.compile(state.model)
    elif fused_kernels_status(params, x.device) == "on":  # (forward checks the model itself)
        step_fn = functools.partial(fused.forward, state.model)
    augment = None
    if params.augment:
        def augment(xb: torch.Tensor) -> torch.Tensor:
            return random_affine(xb, state.generator, params.augment_shift,
                                 params.augment_rotate, params.augment_scale)
    for epoch in range(state.epoch + 1, params.epochs + 1):
        if stops_early(state.history, params.early_stop_patience):
            break
        start = time.perf_counter()
        metrics = train_one_epoch(
            state.model, state.optimizer, x, y, params.batch_size, state.generator,
            params.amp, on_step, step_fn, augment=augment,
            label_smoothing=params.label_smoothing, batch_scheduler=state.batch_scheduler,
            ema=state.ema,
        )
        if val is not None:
            scores = evaluate(state.eval_model(), *val, params.eval_batch_size, params.amp)
            metrics.update(val_loss=scores["loss"], val_accuracy=scores["accuracy"])
            if params.select_best and (state.best is None
                                       or scores["accuracy"] > state.best["val_accuracy"]):
                state.best = {"epoch": epoch, "val_accuracy": scores["accuracy"], "state": {
                    k: v.detach().clone() for k, v in state.eval_model().state_dict().items()}}
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


def final_model(state: TrainState) -> nn.Module:
    """The trained network to report and export: the best epoch's when one was kept."""
    net = state.eval_model()
    if state.best is None:
        return net
    best = copy.deepcopy(net)
    best.load_state_dict(state.best["state"])
    return best
