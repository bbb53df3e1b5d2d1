"""How torch's OpenMP threads wait (its CPU ops, oneDNN and the fused kernels share them).

At a barrier an OpenMP thread first spins, then sleeps. libgomp's default spin is long: on a
machine where another busy process shares the cores, a spinning thread holds the core that
the thread it waits for needs, and two threads run several times slower instead of about
twice. A short spin keeps the quiet machine's speed and slows in proportion to the load
(measured by `bench/train_speed.py` with a competing busy process). The wait changes no
arithmetic: results are the same bits either way.

libgomp reads its settings once, when torch loads it: the train stage applies them before it
imports torch. Settings the user gave (GOMP_SPINCOUNT, OMP_WAIT_POLICY) are kept.
"""

from __future__ import annotations

from collections.abc import Mapping

SPINCOUNT = "1000"
_USER_KEYS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def wait_policy(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to `environ` before torch loads (none if the user chose)."""
    if any(environ.get(key) for key in _USER_KEYS):
        return {}
    return {"GOMP_SPINCOUNT": SPINCOUNT}


def describe(environ: Mapping[str, str]) -> str:
    """The wait settings in `environ`, for the run's `openmp_wait` tag."""
    given = [f"{key}={environ[key]}" for key in _USER_KEYS if environ.get(key)]
    return ", ".join(given) or "libgomp default"
