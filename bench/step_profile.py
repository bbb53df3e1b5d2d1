"""Where a training step of the project's default fp32 path spends its time, on the CPU.

    python bench/step_profile.py --steps 60 --threads 2 --json bench/results/profile.json

Trains with the train stage's loop (`mnist_pipeline.loop.fit`, TrainParams' field defaults:
the reference recipe with the project's speed options, as the `default` row of
bench/train_speed.py) on random batches of MNIST's shape under torch.profiler, after untimed
warm-up steps, a few rounds on fresh models (the fastest round kept; the same steps are also
timed unprofiled, since the profiler slows the step by a varying amount), and sorts every
operator's self CPU time into: the convolutions that oneDNN computes (forward and backward),
the fused kernels (csrc/fused_bn.cpp, the first convolution included), the linear layers,
the optimizer, and the rest. It counts the oneDNN convolutions' multiply-adds from the
model's shapes and measures this CPU's fp32 peak on the same threads (a loop of independent
fused multiply-adds in registers, compiled with the fused kernels' flags by the C compiler;
and a large fp32 matrix multiply), so that their rate can be read against what this CPU
reaches at all. Needs torch (and numpy, through the project's loop) and, for the peak, a C
compiler with OpenMP (`cc`, or $CC).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "bench")]

from mnist_pipeline import openmp  # noqa: E402

os.environ.update(openmp.wait_policy(os.environ))  # as the train stage, before torch loads

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from convolutions import convolution_flops  # noqa: E402  (bench/convolutions.py)
from mnist_pipeline import fused, fused_build  # noqa: E402
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


# Independent vector multiply-add chains, enough to hide the FMA latency on two FMA units and
# few enough to stay in registers (32 with AVX-512, 16 without): the CPU's peak.
PEAK_SOURCE = r"""
#include <omp.h>
#ifdef __AVX512F__
#define LANES 16
#else
#define LANES 8
#endif
#define CHAINS 12
typedef float vec __attribute__((vector_size(LANES * 4)));
double fma_gflops(int threads, long iterations) {
  double start = omp_get_wtime(), sink = 0.0;
  #pragma omp parallel num_threads(threads) reduction(+:sink)
  {
    vec a[CHAINS], b, c;
    for (int i = 0; i < LANES; ++i) { b[i] = 0.9999f; c[i] = 1e-4f; }
    for (int k = 0; k < CHAINS; ++k) for (int i = 0; i < LANES; ++i) a[k][i] = 0.001f * k;
    for (long r = 0; r < iterations; ++r)
      for (int k = 0; k < CHAINS; ++k) a[k] = a[k] * b + c;
    for (int k = 0; k < CHAINS; ++k) sink += a[k][0];
  }
  double seconds = omp_get_wtime() - start;
  // (reading sink keeps the compiler from dropping the loop)
  return sink == -1.0 ? 0.0
      : 2.0 * LANES * CHAINS * (double)iterations * threads / seconds / 1e9;
}
"""


def fma_peak_gflops(threads: int, iterations: int = 20_000_000,
                    repeats: int = 3) -> float | None:
    """The best rate of `threads` threads of register-only fp32 multiply-adds, in GFLOP/s
    (compiled with the fused kernels' flags); None without a working C compiler."""
    compiler = os.environ.get("CC") or shutil.which("cc")
    if compiler is None:
        return None
    with tempfile.TemporaryDirectory(prefix="fma-peak-") as scratch:
        source, library = Path(scratch) / "peak.c", Path(scratch) / "peak.so"
        source.write_text(PEAK_SOURCE)
        built = subprocess.run([compiler, *fused_build.CFLAGS, "-ffp-contract=fast", "-shared",
                                "-fPIC", str(source), "-o", str(library)],
                               capture_output=True, check=False, timeout=120)
        if built.returncode != 0:
            return None
        peak = ctypes.CDLL(str(library)).fma_gflops
        peak.restype, peak.argtypes = ctypes.c_double, (ctypes.c_int, ctypes.c_long)
        return max(peak(threads, iterations) for _ in range(repeats))


def measure(steps: int, warmup: int, rounds: int = 3) -> dict[str, Any]:
    """Profiles `steps` steps `rounds` times, each on a fresh model, and keeps the round of
    the shortest wall time (the one least disturbed by whatever else the machine ran); times
    the same steps unprofiled as often (the fastest kept)."""
    device = torch.device("cpu")
    params = dataclasses.replace(TrainParams(), epochs=1)
    configure_determinism(device, params.cuda_deterministic)
    generator = torch.Generator().manual_seed(0)

    def batches(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n * params.batch_size, 1, 28, 28, generator=generator)
        y = torch.randint(0, 10, (n * params.batch_size,), generator=generator)
        return x.contiguous(memory_format=torch.channels_last), y

    def timed_fit() -> tuple[float, nn.Module]:
        state = build_state(params, device)
        start = time.perf_counter()
        fit(state, params, x, y)
        return time.perf_counter() - start, state.model

    fit(build_state(params, device), params, *batches(warmup))
    x, y = batches(steps)
    unprofiled, profiled = [], []
    for _ in range(rounds):  # the same steps unprofiled too: what the profiler adds
        unprofiled.append(timed_fit()[0])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            profiled.append((*timed_fit(), prof))
    wall, model, prof = min(profiled, key=lambda round_: round_[0])
    seconds: dict[str, float] = {group: 0.0 for group, _ in GROUPS}
    seconds[OTHER] = 0.0
    for event in prof.key_averages():
        seconds[group_of(event.key)] += event.self_cpu_time_total / 1e6
    total = sum(seconds.values())
    conv_flops = convolution_flops(params, device) * steps
    conv_seconds = seconds["convolution (oneDNN)"]
    return {
        "steps": steps, "warmup_steps": warmup, "rounds": rounds, "wall_seconds": wall,
        "unprofiled_wall_seconds": min(unprofiled),
        "fused_kernels": fused.status(params, device, model),
        "groups": [{"name": name, "seconds": s, "share": s / total}
                   for name, s in seconds.items()],
        "conv_gflops": conv_flops / conv_seconds / 1e9,
        "matmul_gflops": matmul_gflops(),
        "fma_peak_gflops": fma_peak_gflops(torch.get_num_threads()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60, help="profiled steps (default 60)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before (default 10)")
    p.add_argument("--rounds", type=int, default=3,
                   help="profile the steps this many times; keep the fastest (default 3)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's)")
    p.add_argument("--json", type=Path, help="write the numbers here as JSON")
    args = p.parse_args(argv)
    if min(args.steps, args.warmup, args.rounds) < 1:
        p.error("--steps, --warmup and --rounds must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {
        "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "command": " ".join(["python", "bench/step_profile.py", *sys.argv[1:]]),
        **measure(args.steps, args.warmup, args.rounds),
    }
    for group in result["groups"]:
        print(f"{group['name']:<45}{group['seconds']:>8.3f} s{group['share']:>7.1%}")
    peak = result["fma_peak_gflops"]
    print(f"oneDNN convolutions: {result['conv_gflops']:.0f} GFLOP/s; fp32 matrix multiply: "
          f"{result['matmul_gflops']:.0f} GFLOP/s; fp32 multiply-add peak: "
          + (f"{peak:.0f} GFLOP/s" if peak else "not measured (no C compiler)")
          + f"; fused kernels {result['fused_kernels']}")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
