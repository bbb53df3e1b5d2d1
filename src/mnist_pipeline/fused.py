"""Fused CPU training kernels for the model's BatchNorm blocks (csrc/fused_bn.cpp).

`bn_relu(x, bn)` is `relu(bn(x))`, `bn_pool_relu(x, bn)` is `relu(max_pool2d(bn(x), 2))` and
`conv_bn_relu(x, conv, bn)` is `relu(bn(conv(x)))` for the model's first convolution (3x3, of
1-channel images), for a BatchNorm2d `bn` in training mode (batch statistics; its running
estimates are updated as BatchNorm2d updates them), on float32 CPU tensors. They compute the
same function and gradients as the eager modules with fewer passes over memory; only the
order of rounding differs (tests/test_fused.py compares them, also against float64).
`forward(model, x)` is `model(x)` for a training MnistCNN with its three conv blocks run
through them: the model class itself is untouched (its state dict, export and evaluation do
not involve them).

The C++ source is compiled on first use with torch.utils.cpp_extension (a C++ compiler with
OpenMP and ninja are needed), then cached under $TORCH_EXTENSIONS_DIR
(default ~/.cache/torch_extensions) for every checkout of the same source. Where it cannot
be built, `extension()` returns None with a warning and the reason in `unavailable_reason()`:
the model then trains with the eager modules, with the same results up to rounding.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .model import MnistCNN
from .params import TrainParams

SOURCE = Path(__file__).with_name("csrc") / "fused_bn.cpp"
# -march=native: the kernels are memory-bound loops that the compiler vectorises for this CPU.
CFLAGS = ("-O3", "-fopenmp", "-march=native")
_failures: list[str] = []


def _cpu_signature() -> str:
    """The CPU's model and instruction-set flags (Linux), else what platform says."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def build_name() -> str:
    """The cached build's name: a hash of the source, the flags, the compiler, torch, the CPU
    (a build for another CPU or torch in a shared cache is never loaded) and Python."""
    key = "\0".join([SOURCE.read_text(), " ".join(CFLAGS),
                     str(shutil.which(os.environ.get("CXX", "c++"))), torch.__version__,
                     str(Path(torch.__file__).parent), _cpu_signature(), sys.version])
    return f"mnist_fused_bn_{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _reason(exc: Exception) -> str:
    """The telling line of a build failure (a compiler error, not ninja's last words)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]  # the compiler's "file:line: error: ..."
    return f"{type(exc).__name__}: {(errors or lines or [''])[0][:300]}"


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
        # load_inline, not load: the source is copied into the build folder (main.cpp), so a
        # checkout at another path (a `dvc exp run --queue` copy, a test's temporary project)
        # reuses the cached build instead of recompiling because ninja saw a new source path.
        # (torch serialises concurrent builds with an OS lock, released if a build is killed)
        return cpp_extension.load_inline(name=build_name(), cpp_sources=[SOURCE.read_text()],
                                         extra_cflags=list(CFLAGS), no_implicit_headers=True)
    except Exception as exc:  # no compiler, no ninja, a read-only cache, ...
        _failures.append(_reason(exc))
        warnings.warn(f"fused CPU kernels unavailable ({_failures[-1]}); training with the "
                      "eager modules (same results up to rounding)", RuntimeWarning,
                      stacklevel=2)
        return None


def unavailable_reason() -> str | None:
    """Why `extension()` returned None (None if it has not failed)."""
    return _failures[-1] if _failures else None


def status(params: TrainParams, device: torch.device) -> str:
    """'on' if training with `params` on `device` runs the fused kernels (built on the first
    call), else 'off' or 'unavailable' with the reason: for the run's record."""
    if not params.fused_kernels:
        return "off"
    for excluded, why in ((device.type != "cpu", device.type), (params.amp != "none", "amp"),
                          (params.compile, "compile"),
                          (not params.channels_last, "needs channels_last")):
        if excluded:
            return f"off ({why})"
    return "on" if extension() is not None else f"unavailable ({unavailable_reason()})"


def _is_bn(m: nn.Module) -> bool:
    return (type(m) is nn.BatchNorm2d and m.affine and m.track_running_stats
            and m.momentum is not None)


def _is_pool(m: nn.Module) -> bool:
    return (type(m) is nn.MaxPool2d and m.kernel_size in (2, (2, 2))
            and m.stride in (2, (2, 2)) and m.padding in (0, (0, 0))
            and m.dilation in (1, (1, 1)) and not m.ceil_mode and not m.return_indices)


def _is_first_conv(m: nn.Module) -> bool:
    """A 3x3 convolution of a 1-channel image with padding 1, as `conv_bn_relu` computes it."""
    return (type(m) is nn.Conv2d and m.in_channels == 1 and m.kernel_size == (3, 3)
            and m.stride == (1, 1) and m.padding == (1, 1) and m.dilation == (1, 1)
            and m.groups == 1 and m.bias is not None and m.padding_mode == "zeros")


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def supports(model: nn.Module) -> bool:
    """Whether `model` is an MnistCNN as built (conv-BN-ReLU, then conv-BN-pool-ReLU twice,
    plain modules, no forward hooks), so that `forward` may run its blocks fused."""
    f = getattr(model, "features", None)
    if (type(model).forward is not MnistCNN.forward or not isinstance(f, nn.Sequential)
            or len(f) != 11):
        return False
    layout = [type(f[i]) is nn.Conv2d for i in (0, 3, 7)]
    layout += [_is_bn(f[i]) for i in (1, 4, 8)] + [_is_pool(f[i]) for i in (5, 9)]
    layout += [type(f[i]) is nn.ReLU for i in (2, 6, 10)]
    hooks = (torch.nn.modules.module._global_forward_hooks
             or torch.nn.modules.module._global_forward_pre_hooks
             or any(_hooked(m) for m in (model, f, *f)))
    return all(layout) and not hooks


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`model(x)`, with the fused kernels where they apply: an MnistCNN as built
    (`supports`) in the channels-last memory format whose BatchNorm layers are in training
    mode, a float32 CPU input, outside autocast and torch.compile, and a built extension;
    else plainly `model(x)`."""
    f = getattr(model, "features", None)
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and supports(model)
            and all(f[i].weight.is_contiguous(memory_format=torch.channels_last)
                    for i in (3, 7))  # (then every conv output is channels-last too)
            and all(f[i].training for i in (1, 4, 8))
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and extension() is not None):
        return model(x)
    if _is_first_conv(f[0]) and not x.requires_grad:
        h = conv_bn_relu(x, f[0], f[1])
    else:
        h = bn_relu(f[0](x), f[1])
    h = bn_pool_relu(f[3](h), f[4])
    h = bn_pool_relu(f[7](h), f[8])
    return model.classifier(h.flatten(1))


class FusedForward(nn.Module):
    """`forward(model, x)` as a module, for DistributedDataParallel to wrap."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward(self.model, x)


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
    @once_differentiable
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
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        out, arg, x, mean, invstd, weight = ctx.saved_tensors
        dx, dw, db = extension().bn_pool_relu_backward(grad_out, out, arg, x, mean, invstd,
                                                       weight)
        return dx, dw, db, None


class _ConvBnRelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, conv_w: torch.Tensor, conv_b: torch.Tensor,
                weight: torch.Tensor, bias: torch.Tensor, eps: float
                ) -> tuple[torch.Tensor, ...]:
        y, mean, invstd, var = extension().conv_bn_relu_forward(x, conv_w, conv_b, weight,
                                                                bias, eps)
        ctx.save_for_backward(y, x, conv_w, conv_b, mean, invstd, weight)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        y, x, conv_w, conv_b, mean, invstd, weight = ctx.saved_tensors
        dcw, dcb, dw, db = extension().conv_bn_relu_backward(grad_y, y, x, conv_w, conv_b,
                                                             mean, invstd, weight)
        # the weight's own strides (channels-last), as DistributedDataParallel's buckets expect
        dcw = torch.empty_like(conv_w).copy_(dcw)
        return None, dcw, dcb, dw, db, None  # (x is the data: it needs no gradient)


def conv_bn_relu(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """relu(bn(conv(x))) for a 3x3, padding-1 `conv` of 1-channel images x that need no
    gradient, `bn` in training mode (float32, CPU; needs `extension()`). The convolution's
    output is computed on the fly, twice each way, and never stored."""
    if x.requires_grad:
        raise ValueError("conv_bn_relu computes no gradient for its input")
    y, mean, var = _ConvBnRelu.apply(x, conv.weight, conv.bias, bn.weight, bn.bias, bn.eps)
    _update_running(bn, mean, var)
    return y


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
