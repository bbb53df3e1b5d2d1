"""The processes a command leaves running and finds again: their PID files, whether they
are alive, free ports, and the private files and logs they keep."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by its owner only from the first byte on."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)  # in case it existed with a wider mode
    os.replace(tmp, path)


def log_tail(path: Path, lines: int = 15) -> str:
    if not path.is_file():
        return f"({path} is empty)"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"last lines of {path}:\n" + "\n".join(f"  {line}" for line in text)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    if Path("/proc/self/stat").exists():
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_ticks(pid: int) -> str | None:
    """When process `pid` started, in clock ticks since boot: fixed for the process's life and
    unlike any later process's with the same PID (None where /proc cannot say)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def write_pid(path: Path, pid: int) -> None:
    """Record `pid` and when it started, so that a process that later gets the same PID is not
    taken for it."""
    path.write_text(f"{pid}\n{start_ticks(pid) or ''}\n")


def read_pid(path: Path, expect: str) -> int | None:
    """The PID on the first line of `path` if that process is alive, its command line holds
    `expect` and it started when the second line says (where the file says); a stale file
    (dead or reused PID) is removed."""
    try:
        lines = path.read_text().splitlines()
        pid = int(lines[0].split()[0])
    except (OSError, ValueError, IndexError):
        return None
    cmdline = Path(f"/proc/{pid}/cmdline")
    ours = expect.encode() in cmdline.read_bytes() if cmdline.exists() else True
    recorded, started = lines[1].strip() if len(lines) > 1 else "", start_ticks(pid)
    if recorded.isdigit() and started is not None:
        ours = ours and recorded == started
    if pid_alive(pid) and ours:
        return pid
    path.unlink(missing_ok=True)
    return None


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
