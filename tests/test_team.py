"""Working as a team, end to end on 127.0.0.1: the pipeline and every command against the
shared tracking server (PostgreSQL, basic auth, proxied artifacts; the session's
`tracking_server`), a login refused before training, PostgreSQL restarted during a training,
a queued sweep of two experiments run two at a time, and data and models shared through a
DVC remote (push, fresh clone, pull)."""

from __future__ import annotations

import filecmp
import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from .conftest import CLI, VENV_BIN, copy_project, mnist_mirror, run
from .test_resume import _command, _epoch_of, inputs  # noqa: F401 (fixture)

pytestmark = pytest.mark.e2e

EXPERIMENT, MODEL = "team", "team-cnn"  # this module's own, on the session's server
SHORT = {"train_subset": 3000, "epochs": 1, "ema_decay": 0.0, "augment": False, "tta": False,
         "experiment_name": EXPERIMENT, "registered_model": MODEL}


@pytest.fixture(scope="module")
def team(tracking_server, tmp_path_factory):
    """A project copy whose pipeline ran once as the DVC experiment `first`, logging to the
    server: (repo, env, server)."""
    env = tracking_server.env(MNIST_MIRROR=str(mnist_mirror()))
    repo = tmp_path_factory.mktemp("team") / "repo"
    copy_project(repo, env)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(SHORT)
    params["promote"]["min_accuracy"] = 0.5
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", "short runs"], repo, env)
    run(["dvc", "exp", "run", "-n", "first"], repo, env)
    return repo, env, tracking_server


def _client(server):
    from mlflow import MlflowClient

    return MlflowClient(server.uri)


@pytest.fixture
def logged_in(tracking_server, monkeypatch):
    """This test process as the server's admin (for MlflowClient and models:/ URIs)."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", tracking_server.username)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", tracking_server.password)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server.uri)
    return tracking_server


def _runs_of(client, name: str) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id],
                              f"tags.DVC_EXP_NAME = '{name}'") if experiment else []


def test_pipeline_and_commands_through_the_server(team, logged_in, tmp_path):
    import mlflow
    import numpy as np

    from .conftest import load_real

    repo, env, server = team
    client = _client(server)
    (found,) = _runs_of(client, "first")
    assert found.info.run_name == "first" and found.info.status == "FINISHED"
    info = json.loads((repo / "models" / "run.json").read_text())
    assert info["run_id"] == found.info.run_id and info["tracking_uri"] == server.uri
    version = client.get_model_version(MODEL, str(info["version"]))
    assert version.run_id == found.info.run_id
    assert float(version.tags["test_accuracy"]) > 0.5  # evaluate scored it through the server

    # artifacts went through the server's proxy; the client kept no store of its own
    assert found.info.artifact_uri.startswith("mlflow-artifacts:/")
    stored = {p.name for p in server.artifacts_dir.rglob("*") if p.is_file()}
    assert {"model.pt", "MLmodel", "served_model.py", "confusion_matrix.png"} <= stored
    assert not (repo / "mlruns" / "mlflow.db").exists()

    run([CLI, "promote"], repo, env)
    assert client.get_model_version_by_alias(MODEL, "champion").version == version.version
    listed = run([CLI, "models", "--json"], repo, env).stdout.splitlines()
    assert json.loads(listed[0])["aliases"] == ["champion"]

    images, labels = load_real("t10k", 8)
    pixels = images[:, None].astype(np.float32) / 255.0
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    assert (model.predict(pixels).argmax(1) == labels).mean() >= 0.5
    from PIL import Image

    digit = tmp_path / "digit.png"
    Image.fromarray(images[0]).save(digit)
    predicted = json.loads(run([CLI, "predict", "--json", str(digit)], repo, env).stdout)
    assert predicted["digit"] == labels[0]

    # the evaluate stage refuses a run.json registered in another store, naming both (run
    # as dvc.yaml runs it, writing elsewhere: the workspace's outputs stay)
    other = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'other.db'}"}
    outs = [a for name in ("metrics", "report", "confusion", "misclassified")
            for a in (f"--{name}", str(tmp_path / f"{name}.out"))]
    refused = run([str(VENV_BIN / "python"), "stages/evaluate.py", "--params", "params.yaml",
                   "--raw", "data/raw", "--run-info", "models/run.json", *outs],
                  repo, {**other, "PYTHONPATH": "src"}, check=False)
    assert refused.returncode != 0
    assert server.uri in refused.stderr and "other.db" in refused.stderr
    assert "Traceback" not in refused.stderr and not list(tmp_path.glob("*.out"))


@pytest.mark.parametrize("password", [None, "wrong-password"])
def test_a_refused_login_stops_before_training(inputs, tracking_server, password,  # noqa: F811
                                               tmp_path):
    server = tracking_server
    env = server.env()
    del env["MLFLOW_TRACKING_PASSWORD"]
    if password is None:
        del env["MLFLOW_TRACKING_USERNAME"]
    else:
        env["MLFLOW_TRACKING_PASSWORD"] = password
    done = run(_command(inputs, tmp_path), tmp_path, env, check=False)
    assert done.returncode != 0
    lines = [ln for ln in done.stderr.splitlines() if server.uri in ln]
    assert len(lines) == 1 and "refused the login (HTTP 401" in lines[0], done.stderr
    assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in lines[0]
    assert "Epoch" not in done.stdout and "Traceback" not in done.stderr
    assert not (tmp_path / "model.pt").exists()
    refused = run([CLI, "models"], tmp_path, env, check=False)
    assert refused.returncode != 0 and "refused the login" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr


def test_postgres_restarted_during_training_loses_nothing(inputs, tracking_server,  # noqa: F811
                                                          logged_in, tmp_path):
    """PostgreSQL goes away after the first epoch and comes back: the run finishes in the
    same process, with every epoch's metrics and its registered version."""
    server = tracking_server
    out = tmp_path / "out"
    out.mkdir()
    train = subprocess.Popen(_command(inputs, out), cwd=out, env=server.env(), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while _epoch_of(out / "ckpt.pt") < 1 and time.monotonic() < deadline:
            assert train.poll() is None, train.communicate()
            time.sleep(0.05)
        server.stop_postgres()
        assert train.poll() is None  # PostgreSQL is down while the training goes on
        time.sleep(3)
    finally:
        server.start_postgres()
    stdout, stderr = train.communicate(timeout=600)
    assert train.returncode == 0, stderr[-3000:]
    info = json.loads((out / "run.json").read_text())
    client = _client(server)
    assert client.get_run(info["run_id"]).info.status == "FINISHED"
    epochs = yaml.safe_load((inputs / "params.yaml").read_text())["train"]["epochs"]
    for key in ("epoch/train_loss", "epoch/lr"):
        steps = sorted(m.step for m in client.get_metric_history(info["run_id"], key))
        assert steps == list(range(1, epochs + 1)), key
    version = client.get_model_version(info["registered_model"], str(info["version"]))
    assert version.run_id == info["run_id"]


def test_queued_sweep_runs_two_at_a_time_without_losing_a_run(team, logged_in):
    repo, env, server = team
    run(["dvc", "exp", "run", "--queue", "-S", "train.lr=0.001,0.002"], repo, env)
    run(["dvc", "queue", "start", "-j", "2"], repo, env)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        status = run(["dvc", "queue", "status"], repo, env).stdout
        if not any(word in status for word in ("Queued", "Running")):
            break
        time.sleep(2)
    assert "Success" in status and "Failed" not in status, status
    names = [line.split()[1] for line in status.splitlines() if "Success" in line]
    assert len(names) == 2
    client = _client(server)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    every = [(r.info.run_name, r.data.tags.get("DVC_EXP_NAME"), r.info.status)
             for r in client.search_runs([experiment.experiment_id])]
    for name in names:
        found = _runs_of(client, name)
        assert len(found) == 1, (name, every)  # one run each, named after its experiment
        (found,) = found
        assert found.info.run_name == name and found.info.status == "FINISHED"
        versions = client.search_model_versions(f"run_id = '{found.info.run_id}'")
        assert len(versions) == 1 and versions[0].name == MODEL
    runs = [_runs_of(client, n)[0] for n in names]
    assert {r.data.params["lr"] for r in runs} == {"0.001", "0.002"}
    # two at a time: each started before the other ended
    assert max(r.info.start_time for r in runs) < min(r.info.end_time for r in runs)


def test_rollback_history_ensemble_and_serving_through_the_server(team, logged_in):
    """The rest of the commands against the server, on the versions the tests above
    registered: promote past the gate and roll back, the history, an ensemble, and `mlflow
    models serve` of the champion."""
    from .conftest import free_port, load_real, wait_for_http
    from .test_promotion import _popen, _post, _stop

    repo, env, server = team
    client = _client(server)
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{MODEL}'"))
    assert len(versions) >= 2
    champion = client.get_model_version_by_alias(MODEL, "champion").version
    other = next(v for v in versions if str(v) != champion)
    run([CLI, "promote", "--version", str(other), "--force", "--reason", "team test"], repo, env)
    back = run([CLI, "rollback"], repo, env)
    assert f"to version {champion}" in back.stdout
    assert client.get_model_version_by_alias(MODEL, "champion").version == champion
    history = [json.loads(ln) for ln in run([CLI, "history", "--json"], repo, env)
               .stdout.splitlines()]
    assert [e["action"] for e in history][-2:] == ["promote", "rollback"]

    done = run([CLI, "ensemble", "--versions", champion, str(other)], repo, env)
    assert f"Registered models:/{MODEL}-ensemble/" in done.stdout

    port = free_port()
    serving = _popen([str(VENV_BIN / "mlflow"), "models", "serve", "-m",
                      f"models:/{MODEL}@champion", "--env-manager", "local", "-h", "127.0.0.1",
                      "-p", str(port)], repo, env)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", serving, timeout=180)
        images, labels = load_real("t10k", 20)
        status, body = _post(f"http://127.0.0.1:{port}/invocations",
                             json.dumps({"inputs": (images[:, None] / 255).tolist()}).encode())
        assert status == 200
        assert sum(int(max(range(10), key=row.__getitem__)) == label for row, label
                   in zip(json.loads(body)["predictions"], labels, strict=True)) >= 14
    finally:
        _stop(serving)


def test_data_and_models_shared_through_a_dvc_remote(team, tmp_path):
    """`dvc push` to a directory remote, then a fresh clone gets every output with `dvc pull`
    (no training) and `dvc status` is clean."""
    repo, env, _ = team
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "-d", "shared", str(remote)], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "first run, with its dvc.lock"], repo, env)
    run(["dvc", "push"], repo, env)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    pulled = run(["dvc", "pull"], clone, env)
    assert "Epoch" not in pulled.stdout
    outputs = ["data/raw/train-images-idx3-ubyte", "data/stats.json", "models/model.pt",
               "models/run.json", "metrics/train.json", "metrics/evaluate.json",
               "plots/confusion.png", "reports/evaluation.json"]
    for path in outputs:
        assert filecmp.cmp(repo / path, clone / path, shallow=False), path
    status = run(["dvc", "status"], clone, env)
    assert "up to date" in status.stdout.lower(), status.stdout
    assert Path(VENV_BIN / "dvc").exists()
