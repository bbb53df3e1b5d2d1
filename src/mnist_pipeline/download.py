"""Fetch the four MNIST files from a list of mirrors, verify them, and store them decompressed.

A mirror is a local folder holding the `.gz` files, or a base address (`http(s)://`, `file://`).
Each file is verified on its decompressed content (MD5 and IDX shape) whichever mirror served it;
network reads have a timeout and a few retries with backoff, then fall through to the next mirror.
"""

from __future__ import annotations

import gzip
import hashlib
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .data import MNIST_FILES, FileSpec
from .errors import PipelineError
from .idx import IdxError, check_array, parse_idx
from .io import atomic_dir

# The mirrors torchvision uses, tried after the user's own (MNIST_MIRROR).
PUBLIC_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
MAX_GZ_BYTES = 64 * 2**20  # no MNIST file is near this; refuse anything bigger


class DownloadError(PipelineError):
    """No mirror produced a verified copy of a file."""


class FetchError(Exception):
    """One attempt at one mirror failed; the next mirror may still work."""


def mirrors_from_env(env: Mapping[str, str], base: Path) -> list[str]:
    """The mirrors to try: $MNIST_MIRROR (if set), then the public ones (unless disabled).

    A relative folder in MNIST_MIRROR is taken relative to `base` (the repository root).
    Set MNIST_PUBLIC_MIRRORS=0 to try only MNIST_MIRROR.
    """
    mirrors = []
    own = env.get("MNIST_MIRROR", "").strip()
    if own:
        mirrors.append(own if _is_url(own) else str(base / Path(own).expanduser()))
    if env.get("MNIST_PUBLIC_MIRRORS", "1").strip().lower() not in {"0", "false", "no", "off"}:
        mirrors += list(PUBLIC_MIRRORS)
    return mirrors


def _is_url(mirror: str) -> bool:
    return mirror.split("://", 1)[0].lower() in {"http", "https", "file"} and "://" in mirror


def fetch_gz(
    mirror: str, name: str, *, timeout: float = 30.0, retries: int = 3, backoff: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
) -> bytes:
    """Return the bytes of `name`.gz from `mirror`; raise FetchError when it cannot be had."""
    if not _is_url(mirror):
        path = Path(mirror).expanduser() / f"{name}.gz"
        try:
            if path.stat().st_size > MAX_GZ_BYTES:
                raise FetchError(f"{path}: larger than {MAX_GZ_BYTES} bytes")
            return path.read_bytes()
        except OSError as exc:
            raise FetchError(f"{path}: {exc.strerror or exc}") from None
    url = mirror.rstrip("/") + f"/{name}.gz"
    error = ""
    for attempt in range(retries):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
                data = response.read(MAX_GZ_BYTES + 1)
            if len(data) > MAX_GZ_BYTES:
                raise FetchError(f"{url}: larger than {MAX_GZ_BYTES} bytes")
            return data
        except urllib.error.HTTPError as exc:
            error = f"HTTP {exc.code}"
            if exc.code == 404:
                break  # retrying will not make it appear
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            error = str(getattr(exc, "reason", exc))
        if attempt + 1 < retries:
            sleep(backoff * 2**attempt)
    raise FetchError(f"{url}: {error} (after {attempt + 1} attempt(s))")


def verify(gz: bytes, spec: FileSpec, source: str) -> bytes:
    """Decompress `gz` and check its MD5 and IDX shape; return the IDX bytes or raise IdxError."""
    try:
        raw = gzip.decompress(gz)
    except (OSError, EOFError, zlib.error) as exc:
        raise IdxError(f"{spec.name}.gz from {source}: not a valid gzip file ({exc})") from None
    actual = hashlib.md5(raw, usedforsecurity=False).hexdigest()
    if actual != spec.md5:
        raise IdxError(
            f"{spec.name} from {source}: checksum mismatch: expected MD5 {spec.md5}, "
            f"got {actual}"
        )
    array = parse_idx(raw, f"{spec.name} from {source}")
    check_array(array, spec.shape, "uint8", f"{spec.name} from {source}")
    return raw


def download(
    out_dir: str | Path, mirrors: Sequence[str], specs: Sequence[FileSpec] = MNIST_FILES,
    **fetch_options: float,
) -> dict[str, str]:
    """Fetch, verify and store every file of `specs` in `out_dir` (all or nothing).

    Returns {file name: mirror that served it}. Raises DownloadError naming every failure.
    """
    if not mirrors:
        raise DownloadError(
            "no MNIST mirror to try: set MNIST_MIRROR to a folder holding the four .gz files "
            "(e.g. MNIST_MIRROR=/data/mnist) or to an http(s):// or file:// base address"
        )
    served: dict[str, str] = {}
    with atomic_dir(out_dir) as tmp:
        for spec in specs:
            failures = []
            for mirror in mirrors:
                try:
                    raw = verify(fetch_gz(mirror, spec.name, **fetch_options), spec, mirror)
                except (FetchError, IdxError) as exc:
                    failures.append(str(exc))
                    continue
                (tmp / spec.name).write_bytes(raw)
                served[spec.name] = mirror
                break
            else:
                raise DownloadError(
                    f"could not get a verified copy of {spec.name}. Tried "
                    f"{len(mirrors)} mirror(s): " + "; ".join(failures) + ". Set MNIST_MIRROR "
                    "to a folder holding the four MNIST .gz files (e.g. /data/mnist) or to "
                    "an http(s):// or file:// base address."
                )
    return served
