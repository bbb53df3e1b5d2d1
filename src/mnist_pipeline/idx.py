"""A strict reader and writer for the IDX format that MNIST ships in.

Layout: 2 zero bytes, a dtype code, the number of dimensions, one big-endian uint32 per
dimension, then the data. The reader checks every part against the file's actual size
before touching the data, so a lying header can never cause a huge allocation.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from .errors import PipelineError

# dtype code -> numpy dtype (big-endian, as IDX stores multi-byte values)
DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
CODES = {dt.newbyteorder("="): code for code, dt in DTYPES.items()}
MAX_DIMS = 8


class IdxError(PipelineError):
    """An IDX file that is malformed, or not the shape or type expected."""


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes into a read-only array; raise IdxError naming `name` and the fault."""
    if len(data) < 4:
        raise IdxError(f"{name}: not an IDX file: {len(data)} bytes, shorter than the header")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise IdxError(f"{name}: not an IDX file: bad magic number 0x{data[:4].hex()}")
    if code not in DTYPES:
        raise IdxError(f"{name}: unknown IDX data type code 0x{code:02x}")
    if not 1 <= ndim <= MAX_DIMS:
        raise IdxError(f"{name}: unsupported number of dimensions {ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxError(f"{name}: truncated header: {len(data)} bytes, need {header}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = DTYPES[code]
    expected = header + int(np.prod(dims, dtype=object)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise IdxError(
            f"{name}: {what}: header says {dims} of {dtype.name}, "
            f"i.e. {expected} bytes, but the file has {len(data)}"
        )
    try:
        array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    except ValueError:  # e.g. an empty array whose other dimensions overflow numpy's limits
        raise IdxError(f"{name}: impossible dimensions {dims}") from None
    return array.astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: str | Path) -> np.ndarray:
    """Read a decompressed IDX file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IdxError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_idx(data, str(path))


def encode_idx(array: np.ndarray) -> bytes:
    """Serialise an array as IDX bytes (the inverse of parse_idx)."""
    native = np.dtype(array.dtype).newbyteorder("=")
    if native not in CODES:
        raise IdxError(f"cannot encode dtype {array.dtype} as IDX")
    code = CODES[native]
    head = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return head + np.ascontiguousarray(array, dtype=DTYPES[code]).tobytes()


def check_array(array: np.ndarray, shape: tuple[int | None, ...], dtype: str, name: str) -> None:
    """Raise IdxError unless `array` has `dtype` and `shape` (None matches any size)."""
    if array.dtype != np.dtype(dtype):
        raise IdxError(f"{name}: expected {dtype} data, got {array.dtype}")
    ok = array.ndim == len(shape) and all(
        s is None or s == a for s, a in zip(shape, array.shape, strict=True))
    if not ok:
        want = "x".join("N" if s is None else str(s) for s in shape)
        raise IdxError(f"{name}: expected shape {want}, got {'x'.join(map(str, array.shape))}")
