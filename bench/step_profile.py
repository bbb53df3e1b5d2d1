"""Where a training step of the project's default fp32 path spends its time, on the CPU.

    python bench/step_profile.py --steps 60 --threads 2 --json bench/results/profile.json

Trains with the train stage's loop (`mnist_pipeline.loop.fit`, TrainParams' field defaults:
the reference recipe with the project's speed options, as the `default` row of
bench/train_speed.py) on random batches of MNIST's shape under torch.profiler, after untimed
warm-up steps, and sorts every operator's self CPU time into: the convolutions that oneDNN
computes (forward and backward), the fused kernels (csrc/fused_bn.cpp, the first
convolution included), the linear layers, the optimizer, and the rest. It counts the oneDNN
convolutions' multiply-adds from the model's shapes and times a large fp32 matrix multiply
on the same threads, so that their rate can be read against what this CPU reaches at all.
Needs only torch (and numpy, through the project's loop).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src")]

from mnist_pipeline import openmp  # noqa: E402

os.environ.update(openmp.wait_policy(os.environ))  # as the train stage, before torch loads

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from mnist_pipeline import fused  # noqa: E402
from mnist_pipeline.io import write_json  # noqa: E402
from mnist_pipeline.loop import build_state, fit  # noqa: E402
from mnist_pipeline.params import TrainParams  # noqa: E402
from mnist_pipeline.runtime import configure_determinism, cpu_model  # noqa: E402

# Operator name -> group, by the first prefix that matches (self CPU time).
GROUPS = (
    ("convolution (oneDNN)", ("aten::mkldnn_convolution", "aten::convolution_backward")),
    ("fused kernels", ("_BnPoolRelu", "_BnRelu", "_ConvBnRelu")),
    ("linear layers", ("aten::mm", "aten::addmm")),
    ("optimizer", ("aten::_fused_adam", "Optimizer.", "aten::lerp", "aten::_foreach")),
)
OTHER = "the rest (loss, batching, autograd, copies)"


def group_of(name: str) -> str:
    return next((group for group, prefixes in GROUPS if name.startswith(prefixes)), OTHER)


def onednn_conv_macs(model: nn.Module, batch: int) -> int:
    """Multiply-adds per training step of the convolutions that oneDNN computes (all but
    the first, which the fused kernel computes): forward, input gradient, weight gradient."""
    macs: list[int] = []

    def count(conv: nn.Module, _: Any, out: torch.Tensor) -> None:
        assert isinstance(conv, nn.Conv2d)
        kh, kw = conv.kernel_size
        macs.append(out.numel() * conv.in_channels // conv.groups * kh * kw)

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks = [conv.register_forward_hook(count) for conv in convs]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(batch, 1, 28, 28))
    finally:
        for hook in hooks:
            hook.remove()
        model.train()
    return 3 * sum(macs[1:])


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """The best fp32 rate of a size x size matrix multiply, in GFLOP/s."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def measure(steps: int, warmup: int) -> dict[str, Any]:
    device = torch.device("cpu")
    params = dataclasses.replace(TrainParams(), epochs=1)
    configure_determinism(device, params.cuda_deterministic)
    generator = torch.Generator().manual_seed(0)

    def batches(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n * params.batch_size, 1, 28, 28, generator=generator)
        y = torch.randint(0, 10, (n * params.batch_size,), generator=generator)
        return x.contiguous(memory_format=torch.channels_last), y

    fit(build_state(params, device), params, *batches(warmup))
    state = build_state(params, device)
    x, y = batches(steps)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        fit(state, params, x, y)
        wall = time.perf_counter() - start
    seconds: dict[str, float] = {group: 0.0 for group, _ in GROUPS}
    seconds[OTHER] = 0.0
    for event in prof.key_averages():
        seconds[group_of(event.key)] += event.self_cpu_time_total / 1e6
    total = sum(seconds.values())
    conv_flops = 2 * onednn_conv_macs(state.model, params.batch_size) * steps
    conv_seconds = seconds["convolution (oneDNN)"]
    return {
        "steps": steps, "warmup_steps": warmup, "wall_seconds": wall,
        "fused_kernels": fused.status(params, device, state.model),
        "groups": [{"name": name, "seconds": s, "share": s / total}
                   for name, s in seconds.items()],
        "conv_gflops": conv_flops / conv_seconds / 1e9,
        "matmul_gflops": matmul_gflops(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60, help="profiled steps (default 60)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before (default 10)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's)")
    p.add_argument("--json", type=Path, help="write the numbers here as JSON")
    args = p.parse_args(argv)
    if min(args.steps, args.warmup) < 1:
        p.error("--steps and --warmup must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {
        "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "command": " ".join(["python", "bench/step_profile.py", *sys.argv[1:]]),
        **measure(args.steps, args.warmup),
    }
    for group in result["groups"]:
        print(f"{group['name']:<45}{group['seconds']:>8.3f} s{group['share']:>7.1%}")
    print(f"oneDNN convolutions: {result['conv_gflops']:.0f} GFLOP/s; fp32 matrix multiply: "
          f"{result['matmul_gflops']:.0f} GFLOP/s; fused kernels {result['fused_kernels']}")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
