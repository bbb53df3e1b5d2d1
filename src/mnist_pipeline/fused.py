"""Fused CPU training kernels for the model's BatchNorm blocks (csrc/fused_bn.cpp).

`bn_relu(x, bn)` is `relu(bn(x))` and `bn_pool_relu(x, bn)` is `relu(max_pool2d(bn(x), 2))`
for a BatchNorm2d `bn` in training mode (batch statistics; its running estimates are updated
as BatchNorm2d updates them), on float32 CPU tensors. They compute the same function and
gradients as the eager modules with fewer passes over memory; only the order of rounding
differs (tests/test_fused.py compares them, also against float64). `forward(model, x)` is
`model(x)` for a training MnistCNN with its three conv blocks run through them: the model
class itself is untouched (its state dict, export and evaluation do not involve them).

The C++ source is compiled on first use with torch.utils.cpp_extension (a C++ compiler with
OpenMP and ninja are needed; about 30 s on 2 cores), then cached under $TORCH_EXTENSIONS_DIR
(default ~/.cache/torch_extensions). Where it cannot be built, `extension()` returns None with
a warning and the reason in `unavailable_reason()`: the model then trains with the eager
modules, with the same results up to rounding.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

SOURCE = Path(__file__).with_name("csrc") / "fused_bn.cpp"
# -march=native: the kernels are memory-bound loops that the compiler vectorises for this CPU.
CFLAGS = ("-O3", "-fopenmp", "-march=native")
STALE_LOCK_SECONDS = 600  # a build takes about 30 s
_failures: list[str] = []


def _cpu_signature() -> str:
    """The CPU's model and instruction-set flags (Linux), else what platform says."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _build_directory(name: str) -> Path:
    """$TORCH_EXTENSIONS_DIR/NAME (default ~/.cache/torch_extensions/NAME), created. A lock
    file left there by a build that was killed (torch would wait for it forever) is removed
    once it is older than any build takes."""
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    directory = Path(base) / name
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / "lock"
    with contextlib.suppress(OSError):
        if time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            lock.unlink()
            warnings.warn(f"removed a stale build lock {lock} (a killed build?)",
                          RuntimeWarning, stacklevel=3)
    return directory


def build_name() -> str:
    """The cached build's name: a hash of the source, the flags, the CPU (a build for another
    CPU in a shared home directory is never loaded) and the Python version."""
    key = "\0".join([SOURCE.read_text(), " ".join(CFLAGS), _cpu_signature(), sys.version])
    return f"mnist_fused_bn_{hashlib.sha256(key.encode()).hexdigest()[:16]}"


@functools.cache
def extension() -> ModuleType | None:
    """The compiled kernels, built on first call (None, with a warning, if that fails)."""
    try:
        # Its import warns "No CUDA runtime is found" on a CPU-only machine: not our concern.
        logger = logging.getLogger("torch.utils.cpp_extension")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            from torch.utils import cpp_extension
        finally:
            logger.setLevel(level)
        name = build_name()
        return cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=list(CFLAGS),
                                  build_directory=str(_build_directory(name)))
    except Exception as exc:  # no compiler, no ninja, a read-only cache, ...
        lines = str(exc).strip().splitlines()
        _failures.append(f"{type(exc).__name__}: {lines[-1] if lines else ''}")
        warnings.warn(f"fused CPU kernels unavailable ({_failures[-1]}); training with the "
                      "eager modules (same results up to rounding)", RuntimeWarning,
                      stacklevel=2)
        return None


def unavailable_reason() -> str | None:
    """Why `extension()` returned None (None if it has not failed)."""
    return _failures[-1] if _failures else None


def _is_bn(m: nn.Module) -> bool:
    return (isinstance(m, nn.BatchNorm2d) and m.affine and m.track_running_stats
            and m.momentum is not None)


def _is_pool(m: nn.Module) -> bool:
    return (isinstance(m, nn.MaxPool2d) and m.kernel_size in (2, (2, 2))
            and m.stride in (2, (2, 2)) and m.padding in (0, (0, 0))
            and m.dilation in (1, (1, 1)) and not m.ceil_mode)


def supports(model: nn.Module) -> bool:
    """Whether `model` has MnistCNN's layout: conv-BN-ReLU, conv-BN-pool-ReLU twice."""
    f = getattr(model, "features", None)
    if not isinstance(f, nn.Sequential) or len(f) != 11:
        return False
    kinds = [isinstance(f[i], nn.Conv2d) for i in (0, 3, 7)]
    kinds += [_is_bn(f[i]) for i in (1, 4, 8)] + [_is_pool(f[i]) for i in (5, 9)]
    kinds += [isinstance(f[i], nn.ReLU) for i in (2, 6, 10)]
    return all(kinds) and hasattr(model, "classifier")


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`model(x)` for an MnistCNN (see `supports`), with the fused kernels where they apply:
    in training mode, float32 on the CPU, outside torch.compile; else plainly `model(x)`."""
    f = model.features
    if not (model.training and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.compiler.is_compiling() and extension() is not None):
        return model(x)
    h = bn_relu(f[0](x), f[1])
    h = bn_pool_relu(f[3](h), f[4])
    h = bn_pool_relu(f[7](h), f[8])
    return model.classifier(h.flatten(1))


def _update_running(bn: nn.BatchNorm2d, mean: torch.Tensor, var_unbiased: torch.Tensor) -> None:
    """BatchNorm2d's own update of its running estimates (momentum form)."""
    with torch.no_grad():
        assert bn.running_mean is not None and bn.running_var is not None
        bn.running_mean.lerp_(mean, bn.momentum)
        bn.running_var.lerp_(var_unbiased, bn.momentum)
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)


class _BnRelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, ...]:
        y, mean, invstd, var = extension().bn_relu_forward(x, weight, bias, eps)
        ctx.save_for_backward(y, x, mean, invstd, weight)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        y, x, mean, invstd, weight = ctx.saved_tensors
        dx, dw, db = extension().bn_relu_backward(grad_y, y, x, mean, invstd, weight)
        return dx, dw, db, None


class _BnPoolRelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, ...]:
        out, arg, mean, invstd, var = extension().bn_pool_relu_forward(x, weight, bias, eps)
        ctx.save_for_backward(out, arg, x, mean, invstd, weight)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        out, arg, x, mean, invstd, weight = ctx.saved_tensors
        dx, dw, db = extension().bn_pool_relu_backward(grad_out, out, arg, x, mean, invstd,
                                                       weight)
        return dx, dw, db, None


def bn_relu(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """relu(bn(x)) for `bn` in training mode (float32, CPU; needs `extension()`)."""
    y, mean, var = _BnRelu.apply(x, bn.weight, bn.bias, bn.eps)
    _update_running(bn, mean, var)
    return y


def bn_pool_relu(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """relu(max_pool2d(bn(x), 2, 2)) for `bn` in training mode (float32, CPU; needs
    `extension()`)."""
    out, mean, var = _BnPoolRelu.apply(x, bn.weight, bn.bias, bn.eps)
    _update_running(bn, mean, var)
    return out
