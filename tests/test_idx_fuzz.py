"""Property-based tests: the IDX reader parses valid files and refuses everything else with its
own IdxError: never another exception, a hang, or a huge allocation from a lying header."""

from __future__ import annotations

import struct

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnist_pipeline.idx import DTYPES, IdxError, encode_idx, parse_idx

FUZZ = settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def arrays(draw):
    code = draw(st.sampled_from(sorted(DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=1, max_size=4)))
    dtype = DTYPES[code].newbyteorder("=")
    data = draw(st.binary(min_size=int(np.prod(shape)) * dtype.itemsize,
                          max_size=int(np.prod(shape)) * dtype.itemsize))
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _parse_or_refuse(data: bytes) -> None:
    try:
        array = parse_idx(data, "fuzz")
    except IdxError as exc:
        assert "fuzz" in str(exc)
        return
    assert array.nbytes <= len(data)  # never more memory than the file's own bytes


@FUZZ
@given(arrays())
def test_valid_files_round_trip(array):
    back = parse_idx(encode_idx(array), "fuzz")
    assert back.shape == array.shape and back.tobytes() == array.tobytes()


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes(data):
    _parse_or_refuse(data)


@FUZZ
@given(arrays(), st.data())
def test_mutated_files(array, data):
    raw = bytearray(encode_idx(array))
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "grow"]))
        if kind == "flip" and raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        elif kind == "cut" and raw:
            del raw[data.draw(st.integers(0, len(raw) - 1)):]
        else:
            raw += data.draw(st.binary(min_size=1, max_size=8))
    _parse_or_refuse(bytes(raw))


@FUZZ
@given(st.sampled_from(sorted(DTYPES)), st.lists(st.integers(0, 2**32 - 1), min_size=1,
                                                  max_size=8), st.binary(max_size=64))
def test_lying_headers(code, dims, body):
    header = struct.pack(">HBB", 0, code, len(dims)) + struct.pack(f">{len(dims)}I", *dims)
    _parse_or_refuse(header + body)
