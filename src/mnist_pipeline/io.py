"""Atomic file output: write to a temporary file beside the target, then rename.

A reader (or DVC) never sees a half-written file: either the old content or the new.
Also where the repository is, for paths that are relative to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import PipelineError


def repo_root(env: Mapping[str, str], cwd: str | Path) -> Path:
    """The repository the pipeline runs for (its mlruns/, relative mirror paths): DVC_ROOT,
    else the DVC repository that holds `cwd` (the nearest folder at or above it with a .dvc/
    folder, as `dvc` finds it), else `cwd` itself.

    DVC sets DVC_ROOT to the main repository even when an experiment runs in a temporary
    copy (`dvc exp run --temp/--queue`), so every run lands in the same store.
    """
    if env.get("DVC_ROOT"):
        return Path(env["DVC_ROOT"]).resolve()
    here = Path(cwd).resolve()
    return next((folder for folder in (here, *here.parents) if (folder / ".dvc").is_dir()),
                here)


def check_target(target: str | Path, folder: bool = False) -> Path:
    """`target` as a Path, with its parent folder made. A target that cannot take a file (or,
    with `folder`, a folder) is a PipelineError naming it: an existing entry of the other kind,
    or a parent folder that cannot be made."""
    target = Path(target)
    if target.exists() and target.is_dir() != folder:
        wanted, found = ("a folder", "a file") if folder else ("a file", "a folder")
        raise PipelineError(f"{target} is {found}; expected {wanted} there")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(f"cannot make the folder {target.parent}: {exc.strerror}") from None
    return target


def check_targets(*targets: str | Path | None) -> None:
    """check_target for every output file that is asked for (None: not asked for), so that a
    stage refuses a path it cannot write before any work."""
    for target in targets:
        if target is not None:
            check_target(target)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `target`; rename it onto `target` if the block succeeds."""
    target = check_target(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | Path, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path, keys: tuple[str, ...] = ()) -> Any:
    """The JSON document in `path`; with `keys`, an object that must hold each of them.
    A file that is missing, unreadable, not JSON or without a key is a PipelineError that
    names it."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path} not found") from None
    except OSError as exc:
        raise PipelineError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:  # not UTF-8, not JSON
        raise PipelineError(f"{path} is not a JSON file ({exc})") from None
    if keys and not isinstance(document, dict):
        raise PipelineError(f"{path}: expected a JSON object, got {type(document).__name__}")
    missing = [key for key in keys if key not in document]
    if missing:
        raise PipelineError(f"{path} has no {', '.join(missing)}")
    return document


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory; it replaces `target` only if the block succeeds.
    The old `target` is renamed aside first and deleted last, so that the moment without
    either is two renames long, not a whole deletion."""
    target = check_target(target, folder=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    old = tmp.with_suffix(".old")
    try:
        yield tmp
        if target.exists():
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:
            if old.exists():
                os.replace(old, target)
            raise
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


def save_png(image: Any, target: str | Path) -> None:
    """A PIL image as a PNG file, written atomically."""
    with atomic_path(target) as tmp:
        image.save(tmp, format="PNG")
