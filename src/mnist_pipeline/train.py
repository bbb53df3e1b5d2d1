"""Training on whole-dataset tensors: no DataLoader, no per-image Python work.

The data live as one normalised float32 tensor on the training device; each epoch draws a
seeded permutation and slices batches by index. `train_one_epoch` and `evaluate` return
metrics and neither print nor log; `fit` runs the epochs and reports through a callback.
"""

from __future__ import annotations

import contextlib
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
    # 15-25% of a CPU training step (bench/RESULTS.md); no kernel reads unwritten memory, so
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


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@dataclass
class TrainState:
    """Everything that a resumed run needs to continue exactly where it stopped."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau | None
    generator: torch.Generator
    epoch: int = 0  # epochs completed
    history: list[dict[str, float]] = field(default_factory=list)


def build_state(params: TrainParams, device: torch.device) -> TrainState:
    """A freshly initialised model, optimizer, scheduler and shuffling generator from the seed."""
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
    generator = torch.Generator().manual_seed(params.seed)
    return TrainState(model, optimizer, scheduler, generator)


def train_one_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
    batch_size: int, generator: torch.Generator, amp: str = "none",
    on_step: Callable[[], None] | None = None, step_fn: Callable | None = None,
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
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            logits = (step_fn if step_fn is not None else model)(xb)
            loss = F.cross_entropy(logits, yb)
        loss.backward()
        optimizer.step()
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
    model: nn.Module, x: torch.Tensor, batch_size: int, amp: str = "none"
) -> torch.Tensor:
    """Logits (N, 10) for every row of x, in eval mode, as float32."""
    model.eval()
    with autocast(x.device, amp):
        chunks = [model(x[i : i + batch_size]).float() for i in range(0, len(x), batch_size)]
    return torch.cat(chunks) if chunks else torch.empty(0, 10, device=x.device)


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, amp: str = "none"
) -> dict[str, float]:
    """Mean cross-entropy and accuracy (a fraction in [0, 1]) over the whole of (x, y)."""
    logits = predict_logits(model, x, batch_size, amp)
    return {
        "loss": F.cross_entropy(logits, y).item(),
        "accuracy": (logits.argmax(1) == y).float().mean().item(),
    }


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def fit(
    state: TrainState, params: TrainParams, x: torch.Tensor, y: torch.Tensor,
    on_epoch_end: EpochCallback | None = None, on_step: Callable[[], None] | None = None,
) -> list[dict[str, float]]:
    """Train from state.epoch + 1 to params.epochs; return the whole per-epoch history."""
    step_fn = torch.compile(state.model) if params.compile else None
    for epoch in range(state.epoch + 1, params.epochs + 1):
        start = time.perf_counter()
        metrics = train_one_epoch(
            state.model, state.optimizer, x, y, params.batch_size, state.generator,
            params.amp, on_step, step_fn,
        )
        if state.scheduler is not None:
            key = "last_batch_loss" if params.plateau_loss == "last_batch" else "train_loss"
            state.scheduler.step(metrics[key])
        metrics["lr"] = current_lr(state.optimizer)
        metrics["epoch_seconds"] = time.perf_counter() - start
        state.epoch = epoch
        state.history.append({"epoch": epoch, **metrics})
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)
    return state.history
