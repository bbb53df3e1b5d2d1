"""The IDX reader: valid files round-trip; every malformed file raises IdxError naming it."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from mnist_pipeline.data import load_split
from mnist_pipeline.idx import IdxError, check_array, encode_idx, parse_idx, read_idx

from .conftest import write_idx


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
def test_round_trip(dtype):
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    if dtype == "uint8":
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    back = parse_idx(encode_idx(array), "x")
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_reads_a_file(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "f", images)), images)


@pytest.mark.parametrize(
    "data, fault",
    [
        (b"", "shorter than the header"),
        (b"\x00\x00", "shorter than the header"),
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "bad magic"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "unknown IDX data type"),
        (b"\x00\x00\x08\x00", "dimensions"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "truncated header"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 3) + b"\x00\x00", "truncated"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 1) + b"\x00\x00", "trailing bytes"),
        # a lying header: 4 billion^3 items claimed, 1 byte present; must not allocate
        (b"\x00\x00\x08\x03" + struct.pack(">III", 2**32 - 1, 2**32 - 1, 2**32 - 1) + b"\x00",
         "truncated"),
    ],
)
def test_malformed_bytes_raise_idx_error(data, fault):
    with pytest.raises(IdxError, match=fault) as info:
        parse_idx(data, "some-file")
    assert "some-file" in str(info.value)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(IdxError, match="nope"):
        read_idx(tmp_path / "nope")


def test_check_array_shape_and_dtype():
    check_array(np.zeros((3, 28, 28), np.uint8), (None, 28, 28), "uint8", "x")
    with pytest.raises(IdxError, match="expected shape Nx28x28, got 3x27x28"):
        check_array(np.zeros((3, 27, 28), np.uint8), (None, 28, 28), "uint8", "x")
    with pytest.raises(IdxError, match="expected uint8"):
        check_array(np.zeros((3, 28, 28), np.int16), (None, 28, 28), "uint8", "x")


def _split(tmp_path, n_images=4, n_labels=4, labels=None, shape=(28, 28)):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((n_images, *shape), np.uint8))
    lab = np.array(labels if labels is not None else [0] * n_labels, np.uint8)
    write_idx(tmp_path / "train-labels-idx1-ubyte", lab)
    return tmp_path


def test_load_split(tmp_path):
    images, labels = load_split(_split(tmp_path, labels=[1, 2, 3, 9]), "train")
    assert images.shape == (4, 28, 28) and labels.dtype == np.int64
    assert labels.tolist() == [1, 2, 3, 9]


@pytest.mark.parametrize(
    "kwargs, fault",
    [
        ({"n_labels": 3}, "4 images but 3 labels"),
        ({"labels": [0, 1, 2, 10]}, "label 10 is not a digit"),
        ({"shape": (28, 27)}, "expected shape Nx28x28"),
    ],
)
def test_load_split_rejects_inconsistent_files(tmp_path, kwargs, fault):
    with pytest.raises(IdxError, match=fault):
        load_split(_split(tmp_path, **kwargs), "train")
