"""The shared tracking server (`mnist-pipeline server`): a real PostgreSQL and `mlflow server`
with basic authentication and proxied artifacts. The command itself, then what it serves:
logins and permissions, host checking, concurrent clients, artifacts through the server."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import requests

from mnist_pipeline import server
from mnist_pipeline.processes import pid_alive
from mnist_pipeline.tracking import check_login

from .conftest import (
    CLI,
    answering_server,
    clean_env,
    free_port,
    postgres_or_skip,
    reachable_tmp_dir,
    run,
)

pytestmark = pytest.mark.e2e

SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"
LOAD_SECONDS = 30
LOAD_CLIENTS = 4
# the session's server is shared with other tests: names of this module's own
SUFFIX = uuid.uuid4().hex[:8]


@pytest.fixture
def as_admin(tracking_server, monkeypatch):
    """This process's MLflow clients log in to the session's server as its admin."""
    for key, value in tracking_server.env().items():
        if key.startswith("MLFLOW_"):
            monkeypatch.setenv(key, value)
    return tracking_server


def test_command_starts_finds_and_stops_the_server(monkeypatch):
    postgres_or_skip()
    base = reachable_tmp_dir("mnist-server-cmd-")
    folder = base / "tracking"
    env = clean_env()
    args = ["--dir", str(folder), "--port", str(free_port()), "--postgres-port",
            str(free_port()), "--workers", "1"]
    try:
        first = run([CLI, "server", "start", *args], base, env, timeout=240)
        assert "Started: MLflow tracking server http://127.0.0.1:" in first.stdout
        assert f"source {folder / 'client.env'}" in first.stdout
        # the stop command it prints stops this server, not the default folder's
        stop_line = next(ln for ln in first.stdout.splitlines() if ln.startswith("Stop it: "))
        stop_command = shlex.split(stop_line.removeprefix("Stop it: "))
        assert stop_command == ["mnist-pipeline", "server", "stop", "--dir", str(folder)]
        # the workers were warmed up before "Started": a first logged-in query answers
        # within the 5 s that cold workers (6-9 s each here) overran
        for line in (folder / "client.env").read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            monkeypatch.setenv(key, value)
        check_login(os.environ["MLFLOW_TRACKING_URI"], timeout=5.0)
        secrets = folder / "credentials.json"
        for private in (secrets, folder / "client.env", folder / "auth.ini"):
            assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
        password = json.loads(secrets.read_text())["admin_password"]
        assert len(password) >= 12
        assert password not in first.stdout
        mlflow_pid = int((folder / "mlflow.pid").read_text().split()[0])
        postgres_pid = int((folder / "postgres" / "postmaster.pid").read_text().split()[0])

        again = run([CLI, "server", "start", *args], base, env, timeout=60)
        assert "Already running: MLflow tracking server" in again.stdout
        assert f"(pid {mlflow_pid})" in again.stdout
        moved = run([CLI, "server", "start", *args, "--allowed-hosts", "box.example"], base,
                    env, timeout=60, check=False)
        assert moved.returncode != 0 and "already runs with --allowed-hosts none (asked: "\
            "box.example)" in moved.stderr and f"server stop --dir {folder}" in moved.stderr
        up = run([CLI, "server", "status", "--dir", str(folder)], base, env)
        assert f"running, pid {mlflow_pid}, answers on http://" in up.stdout
        assert f"running, pid {postgres_pid}" in up.stdout

        stopped = run([CLI, *stop_command[1:]], base, env, timeout=120)
        assert "stopped MLflow and PostgreSQL" in stopped.stdout
        assert not pid_alive(mlflow_pid) and not pid_alive(postgres_pid)
        down = run([CLI, "server", "status", "--dir", str(folder)], base, env, check=False)
        assert down.returncode == 3 and down.stdout.count("stopped") == 2

        (folder / "mlflow.pid").write_text(f"{mlflow_pid}\n")  # stale: that process is gone
        stale = run([CLI, "server", "stop", "--dir", str(folder)], base, env)
        assert "no server" in stale.stdout and not (folder / "mlflow.pid").exists()
    finally:
        server.stop(folder)
        shutil.rmtree(base, ignore_errors=True)


def test_requests_without_a_valid_login_are_refused(tracking_server):
    assert requests.get(tracking_server.uri + SEARCH, timeout=30).status_code == 401
    wrong = requests.get(tracking_server.uri + SEARCH, timeout=30,
                         auth=(tracking_server.username, tracking_server.password + "x"))
    assert wrong.status_code == 401
    right = requests.get(tracking_server.uri + SEARCH, timeout=30,
                         auth=(tracking_server.username, tracking_server.password))
    assert right.status_code == 200
    assert requests.get(tracking_server.uri + "/health", timeout=30).status_code == 200


def test_a_foreign_host_header_is_refused(tracking_server):
    admin = (tracking_server.username, tracking_server.password)
    forged = requests.get(tracking_server.uri + SEARCH, timeout=30, auth=admin,
                          headers={"Host": "evil.example"})
    assert forged.status_code in (400, 403)
    assert "experiments" not in forged.text


def test_a_reader_cannot_move_an_alias_the_admin_can(as_admin, tmp_path):
    from mlflow import MlflowClient
    from mlflow.server import get_app_client

    client = MlflowClient(as_admin.uri)
    name, reader_name = f"guarded-model-{SUFFIX}", f"reader-{SUFFIX}"
    experiment = client.create_experiment(f"alias-permissions-{SUFFIX}")
    run_id = client.create_run(experiment).info.run_id
    (tmp_path / "weights.txt").write_text("weights")
    client.log_artifact(run_id, str(tmp_path / "weights.txt"), "model")
    client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id)

    users = get_app_client("basic-auth", tracking_uri=as_admin.uri)
    users.create_user(reader_name, "reader-password-1")
    users.grant_user_permission(reader_name, "registered_model", name, "READ")

    body = {"name": name, "alias": "champion", "version": version.version}
    url = as_admin.uri + "/api/2.0/mlflow/registered-models/alias"
    reader = (reader_name, "reader-password-1")
    seen = requests.get(as_admin.uri + "/api/2.0/mlflow/registered-models/get",
                        params={"name": name}, auth=reader, timeout=30)
    assert seen.status_code == 200
    assert requests.post(url, json=body, auth=reader, timeout=30).status_code == 403
    assert client.get_registered_model(name).aliases == {}
    admin = (as_admin.username, as_admin.password)
    assert requests.post(url, json=body, auth=admin, timeout=30).status_code == 200
    assert client.get_registered_model(name).aliases == {"champion": version.version}


LOAD_CLIENT = textwrap.dedent("""
    import json, sys, time
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient()
    run_id = client.create_run(sys.argv[3]).info.run_id
    print("ready", flush=True)
    sys.stdin.readline()
    worker, deadline, step = int(sys.argv[1]), time.monotonic() + float(sys.argv[2]), 0
    while time.monotonic() < deadline and step < 100000:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric("load/value", worker * 1e6 + step, now, step),
                                          Metric("load/step", float(step), now, step)])
        step += 1
    client.set_terminated(run_id)
    print(json.dumps({"run_id": run_id, "sent": step}), flush=True)
""")


def test_concurrent_clients_lose_no_metric(as_admin):
    from mlflow import MlflowClient

    env = as_admin.env()
    client = MlflowClient(as_admin.uri)
    experiment = client.create_experiment(f"load-{SUFFIX}")
    procs = [subprocess.Popen([sys.executable, "-c", LOAD_CLIENT, str(worker),
                               str(LOAD_SECONDS), experiment], env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
             for worker in range(LOAD_CLIENTS)]
    try:
        for proc in procs:  # all connected and holding a run before any starts logging
            assert proc.stdout.readline().strip() == "ready", proc.communicate()
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=LOAD_SECONDS + 120)
            assert proc.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()

    for worker, result in enumerate(results):
        assert result["sent"] > 10, result  # the clients really ran
        history = client.get_metric_history(result["run_id"], "load/value")
        assert sorted(m.step for m in history) == list(range(result["sent"]))
        assert {m.value for m in history} == {worker * 1e6 + s for s in range(result["sent"])}
        assert len(client.get_metric_history(result["run_id"], "load/step")) == result["sent"]


def test_artifacts_go_through_the_server(as_admin, tmp_path):
    from mnist_pipeline.tracking import MlflowTracker

    report = tmp_path / "report.json"
    report.write_text('{"accuracy": 0.99}')
    tracker = MlflowTracker(as_admin.uri, "proxied-artifacts")
    with tracker.run(run_name="artifact-proxy"):
        tracker.log_artifact(report, "reports")
    run = tracker.client().get_run(tracker.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    stored = list(as_admin.artifacts_dir.rglob("reports/report.json"))
    assert len(stored) == 1 and stored[0].read_text() == report.read_text()
    assert tracker.run_id in str(stored[0])
    fetched = tracker.client().download_artifacts(tracker.run_id, "reports/report.json",
                                                  str(tmp_path / "back"))
    assert Path(fetched).read_text() == report.read_text()


def test_options_that_differ_from_the_running_servers_are_refused(tmp_path):
    paths = server.ServerPaths(tmp_path)
    server.write_state(paths, host="127.0.0.1", port=5000, allowed_hosts=[], postgres_port=5433)
    same = {"host": "127.0.0.1", "port": 5000, "allowed_hosts": []}
    server.check_unchanged(paths, same)  # the same options: nothing to say
    with pytest.raises(server.ServerError) as refused:
        server.check_unchanged(paths, {**same, "port": 5001, "postgres_port": 6000})
    assert "already runs with --port 5000 (asked: 5001); --postgres-port 5433 (asked: 6000)" \
        in str(refused.value) and "mnist-pipeline server stop" in str(refused.value)


def test_the_server_commands_name_the_folder_unless_it_is_the_default(tmp_path):
    default = tmp_path / ".tracking"
    assert server.server_command("stop", default, default) == "mnist-pipeline server stop"
    assert server.server_command("stop", tmp_path / "my dir", default) == (
        f"mnist-pipeline server stop --dir '{tmp_path / 'my dir'}'")
    assert server.server_command("stop", default) == f"mnist-pipeline server stop --dir {default}"
    assert server.server_command("start", default, default) == "mnist-pipeline server start"


def test_start_up_waits_until_every_query_answers_promptly(monkeypatch, tmp_path):
    """`warm_up` queries until a whole round answers within `quick` seconds; it gives up,
    with the log's end, when the server never gets there."""
    rounds = iter([9.0, float("inf"), 0.4, 0.1])
    asked = []

    def slowest(url, creds, count, timeout=60.0):
        asked.append(count)
        return next(rounds)

    monkeypatch.setattr(server, "slowest_query", slowest)
    monkeypatch.setattr(server, "pid_alive", lambda pid: True)
    creds = server.Credentials("db", "pw", "secret")
    log = tmp_path / "mlflow.log"
    log.write_text("booting\n")
    server.warm_up("http://127.0.0.1:1", creds, 3, 1, log)
    assert asked == [6, 6, 6]  # twice the workers at once, until a prompt round
    monkeypatch.setattr(server, "slowest_query", lambda *args, **kw: 9.0)
    with pytest.raises(server.ServerError, match="(?s)did not answer logged-in queries.*booting"):
        server.warm_up("http://127.0.0.1:1", creds, 3, 1, log, timeout=0.05)


def test_a_refused_query_stops_the_start_up_wait_with_the_servers_answer():
    """Queries go by the name 127.0.0.1 (accepted whatever --allowed-hosts says); a refusal
    is reported at once, not waited out as a slow answer."""
    seen, status = [], [503]

    def answer(request):
        seen.append((request.headers["Host"], request.headers["Authorization"]))
        return status[0], b"Invalid Host header"

    with answering_server(answer) as url:
        creds = server.Credentials("db", "pw", "secret")
        # a server error is a worker not ready yet: no answer, to wait for
        assert server.slowest_query(url, creds, 2) == float("inf")
        status[0] = 403
        with pytest.raises(server.ServerError, match=r"refused a logged-in query \(HTTP 403: "
                                                     r"Invalid Host header\)"):
            server.slowest_query(url, creds, 2, timeout=10)
    port = url.rsplit(":", 1)[1]
    assert seen and all(host == f"127.0.0.1:{port}" and auth.startswith("Basic ")
                        for host, auth in seen)


@pytest.mark.parametrize("option", ["--port", "--postgres-port"])
def test_a_port_out_of_range_is_refused_before_anything_is_made(tmp_path, option):
    from .conftest import CLI

    done = subprocess.run([CLI, "server", "start", "--dir", str(tmp_path / "srv"), option,
                           "99999"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "expected a port number 1-65535" in done.stderr
    assert not (tmp_path / "srv").exists()


def test_a_reused_pid_is_not_taken_for_the_server(tmp_path):
    """After a reboot or a long time, the PID in a PID file may belong to another process,
    even one whose command line says mlflow or postgres (`tail -f .tracking/mlflow.log`):
    `server status` must not call it running, nor `server stop` kill it."""
    from mnist_pipeline import postgres
    from mnist_pipeline.processes import read_pid, start_ticks, write_pid

    def sleeper(*args: str) -> subprocess.Popen:
        """A process with `args` on its command line, once /proc shows them (just after an
        exec, the kernel may not have set them up yet)."""
        proc = subprocess.Popen([sys.executable, "-c", "print(flush=True); import time; "
                                 "time.sleep(60)", *args], stdout=subprocess.PIPE)
        proc.stdout.readline()
        return proc

    other = sleeper("mlflow.log", "postgres")
    try:
        pid_file = tmp_path / "mlflow.pid"
        write_pid(pid_file, other.pid)  # as `server start` records it
        assert read_pid(pid_file, "mlflow") == other.pid
        pid_file.write_text(f"{other.pid}\n{int(start_ticks(other.pid)) - 100}\n")  # reused
        assert read_pid(pid_file, "mlflow") is None and not pid_file.exists()
        pid_file.write_text(f"{other.pid}\n")  # a file without a start time: the command line
        assert read_pid(pid_file, "mlflow") == other.pid

        cluster = postgres.Cluster(tmp_path / "postgres", tmp_path / "postgres.log")
        cluster.data.mkdir(parents=True)
        (cluster.data / "postmaster.pid").write_text(f"{other.pid}\n{cluster.data}\n")
        assert postgres.running_pid(cluster) is None  # a process named postgres, not its -D
        started = sleeper("postgres", "-D", str(cluster.data))
        try:  # as pg_ctl starts it: `.../postgres -D <folder> ...`
            (cluster.data / "postmaster.pid").write_text(f"{started.pid}\n{cluster.data}\n")
            assert postgres.running_pid(cluster) == started.pid
        finally:
            started.kill()
            started.wait()
    finally:
        other.kill()
        other.wait()


def test_a_start_that_cannot_begin_says_why_and_changes_nothing(tmp_path):
    import socket

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for root in (a_file, a_file / "sub"):
        with pytest.raises(server.ServerError, match="cannot make the server's folder"):
            server.start(root, port=free_port())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(server.ServerError, match="is in use by another program"):
            server.start(tmp_path / "new", port=taken.getsockname()[1])
    assert not (tmp_path / "new").exists()  # checked before anything is made

    if os.geteuid() == 0:  # root hands postgres/ to the user postgres, who must pass through
        closed = tmp_path / "closed"
        closed.mkdir(mode=0o700)
        closed.chmod(0o700)
        with pytest.raises(server.ServerError, match="chmod o\\+x"):
            server.start(closed, port=free_port())
        assert stat.S_IMODE(closed.stat().st_mode) == 0o700 and not any(closed.iterdir())


def test_damaged_server_files_are_one_message(tmp_path):
    (tmp_path / "server.json").write_text("{not json")
    with pytest.raises(server.ServerError, match="server.json is damaged"):
        server.status(tmp_path)
    (tmp_path / "server.json").write_text("[]")
    with pytest.raises(server.ServerError, match="server.json is damaged"):
        server.status(tmp_path)
    (tmp_path / "credentials.json").write_text('{"db_password": "x"}')
    with pytest.raises(server.ServerError, match="credentials.json is damaged"):
        server.load_credentials(server.ServerPaths(tmp_path))
