"""Building and loading the fused CPU kernels (csrc/fused_bn.cpp; fused.py uses them).

The C++ source is compiled with torch.utils.cpp_extension by `build()` (`mnist-pipeline
build-kernels`, which `make install` runs), else on first use (`extension()`), and cached under
$TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions) for every checkout of the same
source; a C++ compiler with OpenMP and ninja are needed. The build runs the `ninja` package's
binary (a dependency), whatever `ninja` comes first on PATH: ninja versions keep incompatible
build logs, so a build by another one would compile the cached kernels again in whichever
process loads them next. Where it cannot be built, `extension()` returns None with the
reason in `unavailable_reason()`: the model then trains with the eager modules, with the same
results up to rounding.

Concurrent builds: torch serialises them with filelock's flock on `<build folder>/lock`. The
kernel releases a flock when its holder dies, so a killed build blocks nothing; the empty
`lock` file stays (as after every build) and the next build starts over. What can block is a
lock that a live but stuck process holds, or, on a file system without flock, filelock's
marker file (whose existence is the lock): `clear_stale_lock` removes either once the build
folder has not changed for LOCK_IDLE_LIMIT seconds, and says so.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PipelineError

SOURCE = Path(__file__).with_name("csrc") / "fused_bn.cpp"
# -march=native: the kernels are memory-bound loops that the compiler vectorises for this CPU.
CFLAGS = ("-O3", "-fopenmp", "-march=native")
# A build whose folder has not changed for this long (10 min; compiling takes about a minute)
# is stuck: its lock may be cleared.
LOCK_IDLE_LIMIT = 600.0
_LOAD_LOCK = threading.Lock()
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
    """The telling line of a build failure (the compiler's or the shell's error, not the
    command line or ninja's last words)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    # "file:line: error: ...", "/bin/sh: 1: g++: not found", "...: No such file or directory"
    errors = [ln for ln in lines if "error:" in ln or ln.endswith("not found")
              or "No such file" in ln]
    return f"{type(exc).__name__}: {(errors or lines or [''])[0][:300]}"


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Silence torch.utils.cpp_extension's log below errors: its "No CUDA runtime is found"
    and compiler-compatibility banners (a failure is reported once, by its reason)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _packaged_ninja_binary() -> Path | None:
    """The `ninja` package's binary, None where the package or its binary is missing."""
    try:
        import ninja

        binary = Path(str(ninja.BIN_DIR), "ninja")
    except (ImportError, AttributeError):
        return None
    return binary if ninja.BIN_DIR and binary.is_file() else None


@contextlib.contextmanager
def _packaged_ninja() -> Iterator[None]:
    """PATH led by a private folder that holds only the `ninja` package's binary while torch
    builds (nothing else of the package's folder comes first); PATH as it was where that
    binary is missing: then the system's ninja builds."""
    binary = _packaged_ninja_binary()
    if binary is None:
        yield
        return
    path = os.environ.get("PATH")
    with tempfile.TemporaryDirectory(prefix="mnist-ninja-") as folder:
        (Path(folder) / "ninja").symlink_to(binary)
        os.environ["PATH"] = os.pathsep.join([folder, *([path] if path else [])])
        try:
            yield
        finally:
            if path is None:
                del os.environ["PATH"]
            else:
                os.environ["PATH"] = path


def _cpp_extension() -> ModuleType:
    with _quiet_torch():
        from torch.utils import cpp_extension
    return cpp_extension


def build_folder() -> Path:
    """Where torch builds and caches this source (created if missing)."""
    return Path(_cpp_extension()._get_build_directory(build_name(), verbose=False))


def lock_state(lock: Path) -> str:
    """'absent'; 'free': no process holds it (what a finished or a killed build leaves; it
    blocks no one); 'held': a live process holds its flock; 'marker': this file system has no
    flock, so the file's existence is the lock (filelock's fallback)."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return "absent"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno == errno.ENOSYS:
            return "marker"
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return "held"
        raise
    finally:
        os.close(fd)  # (which releases the probe's own flock)
    return "free"


def _holder(lock: Path) -> int | None:
    """The process holding the lock's flock, from /proc/locks (Linux; None where unknown)."""
    try:
        inode = str(lock.stat().st_ino)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for fields in (line.split() for line in lines):
        # "1: FLOCK  ADVISORY  WRITE 4242 08:01:131 0 EOF" (a waiter's line has "->" in [1])
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].split(":")[-1] == inode:
            return int(fields[4])
    return None


def _idle_seconds(folder: Path, now: float) -> float:
    """Seconds since a file in `folder` (objects, ninja's log, the lock) last changed."""
    times = []
    for entry in os.scandir(folder):
        try:
            times.append(entry.stat().st_mtime)
        except FileNotFoundError:  # removed meanwhile: progress
            return 0.0
    return now - max(times, default=now)


def clear_stale_lock(folder: Path, idle_limit: float = LOCK_IDLE_LIMIT,
                     now: float | None = None) -> str | None:
    """Remove `folder`'s build lock if it blocks (held, or a marker) and the folder has not
    changed for `idle_limit` seconds; return what was done, or None."""
    lock = folder / "lock"
    state = lock_state(lock)
    if state in ("absent", "free"):
        return None
    idle = _idle_seconds(folder, time.time() if now is None else now)
    if idle < idle_limit:
        return None  # a build in progress: torch waits for it
    pid = _holder(lock) if state == "held" else None
    who = (f"held by process {pid}" if pid is not None else
           "held by a process outside this machine's view" if state == "held" else
           "a marker file: no flock on this file system")
    lock.unlink(missing_ok=True)
    return (f"cleared the stale build lock {lock} ({who}; no build progress for "
            f"{idle / 60:.0f} min)")


def _unfinished(folder: Path, name: str) -> str | None:
    """A note if an earlier build in `folder` started and left no library."""
    if lock_state(folder / "lock") == "free" and not (folder / f"{name}.so").exists():
        return (f"an earlier build in {folder} did not finish (killed or failed; its lock "
                "was released): building again")
    return None


def _load() -> tuple[ModuleType, list[str]]:
    """Build (or find built) and import the kernels; notes on locks cleared on the way. One
    thread at a time: the build changes PATH for the process while it runs."""
    with _LOAD_LOCK:
        return _load_unlocked()


def _load_unlocked() -> tuple[ModuleType, list[str]]:
    cpp_extension, name, folder = _cpp_extension(), build_name(), build_folder()
    notes = [n for n in (clear_stale_lock(folder), _unfinished(folder, name)) if n]
    # load_inline, not load: the source is copied into the build folder (main.cpp), so a
    # checkout at another path (a `dvc exp run --queue` copy, a test's temporary project)
    # reuses the cached build instead of recompiling because ninja saw a new source path.
    with _quiet_torch(), _packaged_ninja():
        module = cpp_extension.load_inline(name=name, cpp_sources=[SOURCE.read_text()],
                                           extra_cflags=list(CFLAGS), no_implicit_headers=True,
                                           build_directory=str(folder))
    return module, notes


@functools.cache
def extension() -> ModuleType | None:
    """The compiled kernels, built on first call (None if that fails: the reason is in
    `unavailable_reason()`; training warns of it once, see `status`)."""
    try:
        module, notes = _load()
    except Exception as exc:  # no compiler, no ninja, a read-only cache, ...
        _failures.append(_reason(exc))
        return None
    for note in notes:
        warnings.warn(f"fused CPU kernels: {note}", RuntimeWarning, stacklevel=2)
    return module


def unavailable_reason() -> str | None:
    """Why `extension()` returned None (None if it has not failed)."""
    return _failures[-1] if _failures else None


@dataclass(frozen=True)
class KernelBuild:
    """What `build()` found: the library, whether it was compiled now, and its check."""

    path: Path
    seconds: float
    compiled: bool  # False: the cached build was loaded
    notes: tuple[str, ...]  # stale locks cleared, an unfinished build redone
    problem: str | None  # None: the kernels match the eager modules


def build() -> KernelBuild:
    """Build the kernels now (or load the cached build) and check them against the eager
    modules; a PipelineError with the reason if they cannot be built."""
    start = time.perf_counter()
    try:
        library = build_folder() / f"{build_name()}.so"
        before = library.stat().st_mtime_ns if library.exists() else None
        module, notes = _load()
    except Exception as exc:
        raise PipelineError(f"the fused CPU kernels cannot be built ({_reason(exc)}); "
                            "training will use the eager modules") from None
    path = Path(str(module.__file__))
    return KernelBuild(path, time.perf_counter() - start,
                       before is None or path.stat().st_mtime_ns != before, tuple(notes),
                       self_check(module))


def self_check(module: ModuleType) -> str | None:
    """None if the kernels' forward passes match the eager modules on a small batch, else
    which one does not."""
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(4, 1, 8, 8, generator=g)
    conv = nn.Conv2d(1, 16, 3, padding=1)
    x = torch.randn(4, 16, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(16, generator=g) + 0.5, torch.randn(16, generator=g)

    def bn(t: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(t, None, None, w, b, training=True)

    with torch.no_grad():
        pairs = {
            "bn_relu": (module.bn_relu_forward(x, w, b, 1e-5)[0], F.relu(bn(x))),
            "bn_pool_relu": (module.bn_pool_relu_forward(x, w, b, 1e-5)[0],
                             F.relu(F.max_pool2d(bn(x), 2))),
            "conv_bn_relu": (module.conv_bn_relu_forward(x1, conv.weight, conv.bias, w, b,
                                                         1e-5)[0], F.relu(bn(conv(x1)))),
        }
    for kernel, (got, want) in pairs.items():
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
            return f"{kernel} differs from the eager modules"
    return None
