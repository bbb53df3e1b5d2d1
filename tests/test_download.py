"""The download stage's library: mirrors, retries, verification and all-or-nothing output."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest

from mnist_pipeline.data import FileSpec
from mnist_pipeline.download import (
    PUBLIC_MIRRORS,
    DownloadError,
    FetchError,
    download,
    fetch_gz,
    mirrors_from_env,
)
from mnist_pipeline.idx import encode_idx

from .conftest import ROOT, VENV_BIN, clean_env, run

IMAGES = np.arange(3 * 28 * 28, dtype=np.uint64).astype(np.uint8).reshape(3, 28, 28)
LABELS = np.array([3, 1, 4], np.uint8)


def _spec(name: str, array: np.ndarray) -> FileSpec:
    return FileSpec(name, hashlib.md5(encode_idx(array)).hexdigest(), array.shape)


SPECS = (_spec("tiny-images", IMAGES), _spec("tiny-labels", LABELS))


def _mirror(folder: Path, images=IMAGES, labels=LABELS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in (("tiny-images", images), ("tiny-labels", labels)):
        (folder / f"{name}.gz").write_bytes(gzip.compress(encode_idx(array)))
    return folder


def test_local_folder_mirror(tmp_path):
    out = tmp_path / "out"
    served = download(out, [str(_mirror(tmp_path / "m"))], SPECS)
    assert sorted(p.name for p in out.iterdir()) == ["tiny-images", "tiny-labels"]
    assert (out / "tiny-images").read_bytes() == encode_idx(IMAGES)  # stored decompressed
    assert set(served.values()) == {str(tmp_path / "m")}


def test_file_url_mirror_and_fall_through(tmp_path):
    good = _mirror(tmp_path / "good")
    served = download(tmp_path / "out", [str(tmp_path / "missing"), good.as_uri()], SPECS)
    assert set(served.values()) == {good.as_uri()}


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def http_mirror(tmp_path):
    """A real HTTP server on 127.0.0.1 serving a mirror folder."""
    folder = _mirror(tmp_path / "www")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: _Handler(*a, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_http_mirror(tmp_path, http_mirror):
    served = download(tmp_path / "out", [http_mirror], SPECS, timeout=5)
    assert set(served.values()) == {http_mirror}


def test_http_404_falls_through_without_retrying(tmp_path, http_mirror):
    sleeps = []
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch_gz(http_mirror + "nothing/", "tiny-images", sleep=sleeps.append)
    assert sleeps == []


def test_unreachable_server_is_retried_with_backoff():
    sleeps: list[float] = []
    with pytest.raises(FetchError, match="after 3 attempt"):
        # port 9 on loopback: connection refused at once
        fetch_gz("http://127.0.0.1:9/", "x", timeout=1, retries=3, backoff=0.5,
                 sleep=sleeps.append)
    assert sleeps == [0.5, 1.0]


def test_checksum_mismatch_names_file_expected_actual_and_source(tmp_path):
    bad = _mirror(tmp_path / "bad", images=IMAGES[::-1].copy())
    out = tmp_path / "out"
    with pytest.raises(DownloadError) as info:
        download(out, [str(bad)], SPECS)
    text = str(info.value)
    assert "tiny-images" in text and "checksum mismatch" in text
    actual = hashlib.md5(encode_idx(IMAGES[::-1].copy())).hexdigest()
    assert SPECS[0].md5 in text and actual in text
    assert str(bad) in text and "MNIST_MIRROR" in text
    assert not out.exists()
    assert not list(tmp_path.glob(".out.*"))  # no temporary leftovers


@pytest.mark.parametrize("content, fault", [
    (b"not gzip at all", "not a valid gzip"),
    (gzip.compress(encode_idx(IMAGES))[:100], "not a valid gzip"),  # truncated
])
def test_corrupt_files_are_refused(tmp_path, content, fault):
    mirror = _mirror(tmp_path / "m")
    (mirror / "tiny-images.gz").write_bytes(content)
    with pytest.raises(DownloadError, match=fault):
        download(tmp_path / "out", [str(mirror)], SPECS)
    assert not (tmp_path / "out").exists()


def test_wrong_shape_is_refused_even_with_matching_checksum(tmp_path):
    wrong = IMAGES.reshape(3, 784)
    specs = (FileSpec("tiny-images", hashlib.md5(encode_idx(wrong)).hexdigest(),
                      (3, 28, 28)), SPECS[1])
    mirror = _mirror(tmp_path / "m", images=wrong)
    with pytest.raises(DownloadError, match="expected shape 3x28x28, got 3x784"):
        download(tmp_path / "out", [str(mirror)], specs)


def test_failed_download_keeps_previous_output(tmp_path):
    out = tmp_path / "out"
    download(out, [str(_mirror(tmp_path / "m"))], SPECS)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DownloadError):
        download(out, [str(tmp_path / "missing")], SPECS)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_no_mirrors():
    with pytest.raises(DownloadError, match="MNIST_MIRROR"):
        download("unused", [], SPECS)


def test_mirrors_from_env(tmp_path):
    assert mirrors_from_env({}, tmp_path) == list(PUBLIC_MIRRORS)
    assert mirrors_from_env({"MNIST_MIRROR": "m", "MNIST_PUBLIC_MIRRORS": "0"}, tmp_path) == [
        str(tmp_path / "m")]
    assert mirrors_from_env({"MNIST_MIRROR": "file:///x/"}, tmp_path)[0] == "file:///x/"
    assert mirrors_from_env({"MNIST_MIRROR": "/abs"}, tmp_path)[0] == "/abs"


def test_stage_reports_unreachable_mirror_in_one_message(tmp_path):
    env = clean_env(MNIST_MIRROR=str(tmp_path / "nowhere"))
    done = run([str(VENV_BIN / "python"), str(ROOT / "stages/download.py"),
                "--out", str(tmp_path / "out")], tmp_path, env, check=False)
    assert done.returncode == 1
    assert done.stderr.startswith("error: could not get a verified copy of")
    assert "Traceback" not in done.stderr and "MNIST_MIRROR" in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    from mnist_pipeline.io import atomic_dir

    target = tmp_path / "raw"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("half")
        raise RuntimeError("killed mid-download")
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]  # the old folder, nothing beside
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]
    assert [p.name for p in target.iterdir()] == ["new.txt"]


@pytest.mark.parametrize("stage, out, fault", [
    ("compute_stats", "taken", "taken is a folder; expected a file there"),
    ("compute_stats", "file/stats.json", "cannot make the folder"),
    ("download", "file", "file is a file; expected a folder there"),
    ("download", "file/raw", "cannot make the folder"),
])
def test_stages_refuse_an_output_path_that_cannot_take_their_output(tmp_path, stage, out, fault):
    (tmp_path / "taken").mkdir()
    (tmp_path / "file").write_text("kept")
    raw = tmp_path / "raw"
    raw.mkdir()
    for split in ("train", "t10k"):
        (raw / f"{split}-images-idx3-ubyte").write_bytes(encode_idx(IMAGES))
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(encode_idx(LABELS))
    env = clean_env(MNIST_MIRROR=str(tmp_path / "nowhere"))
    inputs = ["--raw", str(raw)] if stage == "compute_stats" else []
    before = sorted(p.name for p in tmp_path.iterdir())
    done = run([str(VENV_BIN / "python"),
                str(ROOT / "stages" / f"{stage}.py"), *inputs, "--out", str(tmp_path / out)],
               tmp_path, env, check=False)
    assert done.returncode == 1 and fault in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written beside
    assert (tmp_path / "file").read_text() == "kept" and not any((tmp_path / "taken").iterdir())
