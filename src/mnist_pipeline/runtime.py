"""Where and how a computation runs: device choice, determinism, autocast, CPU allocator, and
the record of it that goes with every run. Nothing here changes what a model computes except
`autocast` (bf16) and the non-deterministic CUDA mode, both chosen by params.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
from pathlib import Path

import torch
import torch.utils.deterministic

from .errors import PipelineError


def select_device(requested: str = "auto") -> torch.device:
    """'auto' picks CUDA when a GPU is present, else the CPU; otherwise the named device
    ('cpu', 'cuda' or 'cuda:N'), refused with a message when it is not one or is absent."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise PipelineError(f"device {requested!r}: expected auto, cpu, cuda or cuda:N "
                            "(MNIST_DEVICE or --device)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"device {requested!r} was asked for, but no CUDA GPU is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise PipelineError(f"device {requested!r} was asked for, but there are only "
                            f"{torch.cuda.device_count()} CUDA GPU(s)")
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
    # Deterministic mode also fills every new tensor with NaN, a debugging aid that costs a
    # noticeable share of a CPU training step; no kernel reads unwritten memory, so the
    # results are bit-identical without it (tests/test_loop.py checks this).
    torch.utils.deterministic.fill_uninitialized_memory = False
    return "deterministic"


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for amp='bf16', else nothing."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def tune_cpu_allocator() -> bool:
    """On glibc, keep freed blocks in the heap instead of returning them to the OS; True if so.

    By default each step's large activations are mapped afresh and page-faulted in, for every
    training step and evaluation batch (bench/RESULTS.md measures what this saves).
    Process-wide and idempotent; numerics are untouched.
    """
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return False
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, ValueError):  # not glibc: macOS, Windows, musl
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # 32 MiB is glibc's largest mmap threshold: (100, 32, 28, 28) float32 is 10 MB
    return bool(mallopt(m_mmap_threshold, 32 << 20) and mallopt(m_trim_threshold, 1 << 30))


def cpu_model() -> str:
    """The CPU's model name (Linux), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_tags(device: torch.device, determinism: str) -> dict[str, str]:
    """The device, thread count and library versions, recorded with every run."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return {
        "device": device.type,
        "device_name": name,
        "torch_version": torch.__version__,
        "cuda_version": str(torch.version.cuda) if device.type == "cuda" else "none",
        "determinism": determinism,
        "cpu_threads": str(torch.get_num_threads()),
        "python_version": sys.version.split()[0],
    }
