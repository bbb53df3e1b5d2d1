"""A tracking server that goes away during training: training goes on, nothing is lost, and a
re-run after the server is back only logs and registers. Uses a real `mlflow server`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from .conftest import VENV_BIN, clean_env, free_port, run, wait_for_http
from .test_resume import PARAMS, _command, _epoch_of, inputs  # noqa: F401 (fixture)

pytestmark = pytest.mark.e2e


def _start_server(store: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--artifacts-destination", str(store / "artifacts")],
        cwd=store, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    wait_for_http(f"http://127.0.0.1:{port}/health", proc)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_server_lost_mid_run_then_back(inputs, tmp_path):  # noqa: F811
    from mlflow import MlflowClient

    store, out = tmp_path / "store", tmp_path / "out"
    store.mkdir(), out.mkdir()
    (out / "run.json").write_text('{"run_id": "an earlier run"}')  # run by hand, not by dvc
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = clean_env(MLFLOW_TRACKING_URI=uri)
    server = _start_server(store, port)
    try:
        train = subprocess.Popen(_command(inputs, out), cwd=out, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while _epoch_of(out / "ckpt.pt") < 1 and time.monotonic() < deadline:
            assert train.poll() is None, train.communicate()
            time.sleep(0.05)
    finally:
        _stop(server)  # the store goes away after the first epoch
    stdout, stderr = train.communicate(timeout=600)

    assert train.returncode == 1, stderr
    assert "Epoch: 3," in stdout  # training went on without the store
    assert "unreachable" in stderr and "re-run" in stderr and "Traceback" not in stderr
    assert (out / "model.pt").exists()  # weights kept
    assert _epoch_of(out / "ckpt.pt") == PARAMS["epochs"]
    assert not (out / "run.json").exists()  # nothing that looks like a finished stage
    run_id = torch.load(out / "ckpt.pt", weights_only=True)["run_id"]

    server = _start_server(store, port)
    try:
        again = run(_command(inputs, out), out, env)
        assert f"Resuming after epoch {PARAMS['epochs']}" in again.stdout
        assert "Epoch:" not in again.stdout.replace("Resuming after epoch", "")  # no training
        client = MlflowClient(uri)
        assert client.get_run(run_id).info.status == "FINISHED"
        for key in ("epoch/train_loss", "epoch/lr"):
            assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2, 3]
        info = json.loads((out / "run.json").read_text())
        assert info["run_id"] == run_id
        assert client.get_model_version("mnist-cnn", str(info["version"])).run_id == run_id
    finally:
        _stop(server)
