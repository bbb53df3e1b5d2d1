"""Process-wide CPU memory allocator tuning for training and evaluation (glibc only)."""

from __future__ import annotations

import ctypes
import os


def tune_cpu_allocator() -> bool:
    """On glibc, keep freed blocks in the heap instead of returning them to the OS; True if so.

    By default each step's large activations are mapped afresh and page-faulted in (13,000 to
    19,000 faults a step here): 30-45% of a CPU training step (bench/RESULTS.md), and likewise
    for each evaluation batch. Process-wide and idempotent; numerics are untouched.
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
