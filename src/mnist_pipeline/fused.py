"""Fused CPU training kernels for the model's BatchNorm blocks (csrc/fused_bn.cpp).

`bn_relu(x, bn)` is `relu(bn(x))`, `bn_pool_relu(x, bn)` is `relu(max_pool2d(bn(x), 2))` and
`conv_bn_relu(x, conv, bn)` is `relu(bn(conv(x)))` for the model's first convolution (3x3, of
1-channel images), for a BatchNorm2d `bn` in training mode (batch statistics; its running
estimates are updated as BatchNorm2d updates them), on float32 CPU tensors. They compute the
same function and gradients as the eager modules with fewer passes over memory; only the
order of rounding differs (tests/test_fused.py compares them, also against float64). Their
sums are split into a fixed number of chunks, not one per thread: for a given build the
results are the same bits with any number of threads. The build is for this CPU
(-march=native), so another CPU or compiler can round differently.
`forward(model, x)` is `model(x)` for a training MnistCNN with its three conv blocks run
through them: the model class itself is untouched (its state dict, export and evaluation do
not involve them). `status(params, device, model)` says whether training runs them, or why
not: the run's `fused_kernels` tag.

Building and loading them: fused_build.py.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .fused_build import extension, unavailable_reason
from .model import MnistCNN
from .params import TrainParams

BUILD_FAILED, MODEL_NOT_SUPPORTED = "build failed", "model not supported"


def _params_reason(params: TrainParams, device: torch.device) -> str | None:
    """Why training with `params` on `device` does not use the kernels, whatever the model."""
    for excluded, why in ((not params.fused_kernels, "disabled by params"),
                          (device.type != "cpu", f"device not CPU: {device.type}"),
                          (params.amp != "none", f"amp {params.amp}"),
                          (params.compile, "torch.compile"),
                          (not params.channels_last, "needs channels_last")):
        if excluded:
            return why
    return None


def status(params: TrainParams, device: torch.device, model: nn.Module | None = None) -> str:
    """'on' if training `model` (when given) with `params` on `device` runs the fused
    kernels, as `forward` decides at each step (building them on the first call), else
    'off (<reason>)': the run's `fused_kernels` tag."""
    why = _params_reason(params, device)
    if why is None and model is not None:
        why = _model_reason(model)  # (training mode: train_one_epoch sets it)
    if why is None and extension() is None:
        why = f"{BUILD_FAILED}: {unavailable_reason()}"
    return "on" if why is None else f"off ({why})"


def is_fallback(status_: str) -> bool:
    """Whether `status_` falls back although params ask for the kernels where they apply (a
    failed build, a model they do not take): worth a warning, unlike a GPU or bf16 run."""
    return status_.startswith((f"off ({BUILD_FAILED}", f"off ({MODEL_NOT_SUPPORTED}"))


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


# MnistCNN.features as the kernels take it: position -> (what, test)
_CONV = ("Conv2d", lambda m: type(m) is nn.Conv2d)
_BN = ("BatchNorm2d (affine, tracking running stats, with a momentum)", _is_bn)
_RELU = ("ReLU", lambda m: type(m) is nn.ReLU)
_POOL = ("MaxPool2d(2, 2)", _is_pool)
_LAYOUT = (_CONV, _BN, _RELU, _CONV, _BN, _POOL, _RELU, _CONV, _BN, _POOL, _RELU)


def unsupported(model: nn.Module) -> str | None:
    """Why `forward` cannot run `model`'s blocks fused, or None if it is an MnistCNN as built
    (conv-BN-ReLU, then conv-BN-pool-ReLU twice, plain modules, no forward hooks)."""
    f = getattr(model, "features", None)
    if type(model).forward is not MnistCNN.forward:
        return f"{type(model).__name__} has a forward of its own"
    if not isinstance(f, nn.Sequential) or len(f) != len(_LAYOUT):
        return f"features is not a Sequential of {len(_LAYOUT)} layers"
    for i, (what, fits) in enumerate(_LAYOUT):
        if not fits(f[i]):
            return f"features.{i} is {f[i]!r}, not a {what}"
    if (torch.nn.modules.module._global_forward_hooks
            or torch.nn.modules.module._global_forward_pre_hooks
            or any(_hooked(m) for m in (model, f, *f))):
        return "forward hooks"
    return None


def supports(model: nn.Module) -> bool:
    """Whether `forward` may run `model`'s blocks fused (see `unsupported`)."""
    return unsupported(model) is None


def _model_reason(model: nn.Module) -> str | None:
    """Why `forward` runs a training `model` on float32 CPU input without the kernels."""
    why = unsupported(model)
    if why is not None:
        return f"{MODEL_NOT_SUPPORTED}: {why}"
    f = model.features
    if not all(f[i].weight.is_contiguous(memory_format=torch.channels_last) for i in (3, 7)):
        return "needs channels_last"  # (then every conv output is channels-last too)
    return None


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`model(x)`, with the fused kernels where they apply: an MnistCNN as built
    (`supports`) in the channels-last memory format whose BatchNorm layers are in training
    mode, a float32 CPU input, outside autocast and torch.compile, and a built extension;
    else plainly `model(x)`."""
    if not (x.device.type == "cpu" and x.dtype == torch.float32
            and _model_reason(model) is None
            and all(model.features[i].training for i in (1, 4, 8))
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and extension() is not None):
        return model(x)
    f = model.features
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
