"""Interrupted training resumes exactly: a real stage process is SIGKILLed mid-run, re-run, and
must end with the same weights, metrics and MLflow run as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from mnist_pipeline.checkpoint import CheckpointError, load_state_file, save_checkpoint
from mnist_pipeline.loop import build_state
from mnist_pipeline.params import TrainParams
from mnist_pipeline.train_stage import TrainOutputs, run_training

from .conftest import ROOT, VENV_BIN, clean_env, mnist_mirror, run

pytestmark = pytest.mark.e2e
PARAMS = {"epochs": 3, "train_subset": 3000, "batch_size": 100, "val_size": 500}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Real MNIST in IDX form, its stats, and a params file for a short run."""
    from mnist_pipeline.download import download

    folder = tmp_path_factory.mktemp("inputs")
    download(folder / "raw", [str(mnist_mirror())])
    (folder / "stats.json").write_text(json.dumps({"mean": 0.1307, "std": 0.3081}))
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    doc["train"].update(PARAMS)
    (folder / "params.yaml").write_text(yaml.safe_dump(doc))
    return folder


def _command(inputs: Path, out: Path) -> list[str]:
    return [str(VENV_BIN / "python"), str(ROOT / "stages" / "train.py"),
            "--params", str(inputs / "params.yaml"), "--raw", str(inputs / "raw"),
            "--stats", str(inputs / "stats.json"), "--weights", str(out / "model.pt"),
            "--metrics", str(out / "train.json"), "--history", str(out / "history.json"),
            "--run-info", str(out / "run.json"), "--checkpoint", str(out / "ckpt.pt"),
            "--device", "cpu"]


def _epoch_of(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["epoch"])
    except Exception:
        return -1


def test_killed_run_resumes_to_the_same_result(inputs, tmp_path):
    from mlflow import MlflowClient

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for folder in (straight, killed):
        folder.mkdir()
    run(_command(inputs, straight), straight, clean_env())

    env = clean_env()
    proc = subprocess.Popen(_command(inputs, killed), cwd=killed, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _epoch_of(killed / "ckpt.pt") < 1 and time.monotonic() < deadline:
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.05)
    time.sleep(0.5)  # into the next epoch
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stopped_at = _epoch_of(killed / "ckpt.pt")
    assert 1 <= stopped_at < PARAMS["epochs"]
    run_id = torch.load(killed / "ckpt.pt", weights_only=True)["run_id"]
    assert not (killed / "model.pt").exists()

    resumed = run(_command(inputs, killed), killed, env)
    assert f"Resuming after epoch {stopped_at}" in resumed.stdout

    assert (killed / "model.pt").read_bytes() == (straight / "model.pt").read_bytes()
    a = json.loads((straight / "train.json").read_text())
    b = json.loads((killed / "train.json").read_text())
    assert a["train_loss"] == b["train_loss"] and a["train_accuracy"] == b["train_accuracy"]
    info = json.loads((killed / "run.json").read_text())
    assert info["run_id"] == run_id  # the same MLflow run, continued
    client = MlflowClient(f"sqlite:///{killed / 'mlruns' / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "epoch/train_loss")]
    assert sorted(steps) == [1, 2, 3]
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1


def _outputs(folder: Path) -> TrainOutputs:
    return TrainOutputs(folder / "w.pt", folder / "m.json", folder / "h.json", folder / "r.json",
                        folder / "ckpt.pt")


def test_checkpoint_from_other_params_is_discarded(inputs, tmp_path):
    params = TrainParams(epochs=1, train_subset=500)
    other = build_state(TrainParams(epochs=1, train_subset=500, lr=0.01), torch.device("cpu"))
    other.epoch = 1
    save_checkpoint(tmp_path / "ckpt.pt", other, None, fingerprint="other params", complete=False)
    lines: list[str] = []
    run_training(params, inputs / "raw", {"mean": 0.1307, "std": 0.3081}, _outputs(tmp_path),
                 torch.device("cpu"), print_fn=lines.append)
    assert any(line.startswith("Discarding checkpoint") for line in lines)
    assert any(line.startswith("Epoch: 1,") for line in lines)  # trained afresh
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["complete"] is True


@pytest.mark.parametrize("content", [b"", b"garbage", b"PK\x03\x04truncated zip"])
def test_corrupt_checkpoint_or_weights_give_a_clear_error(inputs, tmp_path, content):
    (tmp_path / "ckpt.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable PyTorch state file"):
        load_state_file(tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="ckpt.pt"):
        run_training(TrainParams(epochs=1, train_subset=200), inputs / "raw",
                     {"mean": 0.1307, "std": 0.3081}, _outputs(tmp_path), torch.device("cpu"),
                     print_fn=lambda line: None)


def test_state_files_refuse_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": subprocess.Popen}, path)  # a pickled global: refused by weights_only
    with pytest.raises(CheckpointError):
        load_state_file(path)


def test_unreachable_tracking_server_fails_fast_naming_it(inputs, tmp_path):
    from .conftest import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    done = run(_command(inputs, tmp_path), tmp_path, clean_env(MLFLOW_TRACKING_URI=uri),
               check=False)
    assert done.returncode == 1 and time.monotonic() - started < 60
    assert uri in done.stderr and "unreachable" in done.stderr
    assert "Traceback" not in done.stderr and "Epoch" not in done.stdout
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "ckpt.pt").exists()
