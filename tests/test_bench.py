"""bench/train_speed.py end to end on a tiny MNIST copy: it runs without PyYAML or MLflow (as on
the GPU machine) and writes the table and the JSON it promises. Behaviour only, never speed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from .conftest import ROOT, load_real, write_idx

# Run the script as the GPU machine would: with PyYAML, MLflow and DVC impossible to import.
RUNNER = ("import runpy, sys; sys.modules.update(yaml=None, mlflow=None, dvc=None); "
          "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


@pytest.fixture(scope="module")
def tiny_raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("bench") / "raw"
    raw.mkdir()
    for split, n in (("train", 400), ("t10k", 200)):
        images, labels = load_real(split, n)
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels.astype(np.uint8))
    return raw


def run_bench(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", RUNNER, str(ROOT / "bench" / "train_speed.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_bench_writes_the_table_and_json_without_yaml_or_mlflow(tiny_raw, tmp_path):
    out = tmp_path / "out.json"
    done = run_bench("--device", "cpu", "--steps", "2", "--epochs", "1", "--warmup", "1",
                     "--threads", "1", "--variant", "default", "--variant",
                     "fused+channels_last", "--recipe", "--recipe-epochs", "2",
                     "--raw", str(tiny_raw), "--stats", str(tmp_path / "none.json"),
                     "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["name"] for r in report["rows"]] == ["reference", "default", "fused+channels_last"]
    for row in report["rows"]:
        assert row["seconds_per_epoch"] > 0 and row["images_per_second"] > 0
        assert 0 <= row["test_accuracy"] <= 1 and len(row["runs"]) == 1
        assert row["runs"][0]["images"] == 200  # 1 epoch x 2 steps x 100 images
    assert report["rows"][2]["overrides"] == {"fused_optimizer": True, "channels_last": True}
    assert report["speedup"] == pytest.approx(report["rows"][1]["ratio"]) and report["speedup"] > 0
    assert report["machine"]["threads"] == 1 and report["machine"]["cpu"]
    assert report["settings"]["accuracy_after"] == "1 epoch(s) of 2 steps"
    assert [len(r["accuracy_per_epoch"]) for r in report["recipe"]] == [2, 2]
    assert set(report["recipe"][0]) >= {"train_seconds", "epoch_reached", "seconds_to_target"}
    assert "reference" in done.stdout and "project fused+channels_last" in done.stdout


def test_bench_rejects_an_unknown_variant_before_any_work(tiny_raw):
    done = run_bench("--variant", "fused+turbo", "--raw", str(tiny_raw))
    assert done.returncode == 2 and "unknown variant token 'turbo'" in done.stderr
