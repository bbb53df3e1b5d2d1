"""The convolutions that oneDNN computes in a training step of the project's model, for the
benchmarks: which they are (all three, or the second and third when the fused kernel computes
the first), their arithmetic, and the same work on random data without the rest of the step
(bench/train_speed.py's `convolutions` row; bench/step_profile.py's rate).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from mnist_pipeline.fused import status as fused_status
from mnist_pipeline.loop import build_state
from mnist_pipeline.params import TrainParams


class ConvCall(NamedTuple):
    """One convolution of a training step: its input's and output's shapes, and whether the
    step computes its input's gradient (not for the first, whose input is the image)."""
    conv: nn.Conv2d
    input_shape: torch.Size
    output_shape: torch.Size
    input_grad: bool

    @property
    def macs(self) -> int:
        """Multiply-adds of its forward (each gradient it computes takes as many)."""
        kh, kw = self.conv.kernel_size
        return self.output_shape.numel() * self.conv.in_channels // self.conv.groups * kh * kw

    @property
    def flops(self) -> int:
        """Floating-point operations in a step: forward, weight and maybe input gradient."""
        return 2 * self.macs * (3 if self.input_grad else 2)


def onednn_convolutions(params: TrainParams, device: torch.device) -> list[ConvCall]:
    """The convolutions of `params`' model that oneDNN computes in a training step on
    `device` (all but the first when the fused kernels compute it), for one batch."""
    model = build_state(params, device).model  # (the step's model, memory format included)
    calls: list[ConvCall] = []

    def record(conv: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        assert isinstance(conv, nn.Conv2d)
        calls.append(ConvCall(conv, inputs[0].shape, out.shape, input_grad=bool(calls)))

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks = [conv.register_forward_hook(record) for conv in convs]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(params.batch_size, 1, 28, 28, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    fused_first = fused_status(params, device, model.train()) == "on"
    return calls[1:] if fused_first else calls


def convolution_flops(params: TrainParams, device: torch.device) -> int:
    """Floating-point operations of the oneDNN convolutions in one training step."""
    return sum(call.flops for call in onednn_convolutions(params, device))


class Prepared(NamedTuple):
    """One convolution's call, with a random input and output gradient for it."""
    call: ConvCall
    x: torch.Tensor
    grad: torch.Tensor


def prepare(params: TrainParams, device: torch.device) -> list[Prepared]:
    """Random inputs and output gradients for `onednn_convolutions`, in the model's memory
    format; an input requires its gradient where the step computes it."""
    memory_format = torch.channels_last if params.channels_last else torch.contiguous_format
    generator = torch.Generator(device).manual_seed(0)
    work: list[Prepared] = []
    for call in onednn_convolutions(params, device):
        x = torch.randn(call.input_shape, device=device, generator=generator)
        x = x.contiguous(memory_format=memory_format).requires_grad_(call.input_grad)
        grad = torch.randn(call.output_shape, device=device, generator=generator)
        work.append(Prepared(call, x, grad.contiguous(memory_format=memory_format)))
    return work


def run(work: list[Prepared], steps: int) -> None:
    """`steps` times what the convolutions of one training step compute: each one's forward
    and its gradients (autograd, as in the step)."""
    for _ in range(steps):
        for call, x, grad in work:
            params = tuple(call.conv.parameters())
            torch.autograd.grad(call.conv(x), (x, *params) if call.input_grad else params, grad)
