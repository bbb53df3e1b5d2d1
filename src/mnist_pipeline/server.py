"""The shared tracking server: MLflow on a PostgreSQL store, with basic authentication and
proxied artifacts, everything it keeps in one folder (default `.tracking/`).

    mnist-pipeline server start [--dir PATH] [--host H --port P --allowed-hosts NAMES]
    mnist-pipeline server status | stop

The folder holds `postgres/` (the cluster), `artifacts/` (what clients upload through the
server), `credentials.json`, `auth.ini` and `client.env` (secrets, mode 0600), `server.json`
(the ports), `mlflow.pid` and the two logs. PostgreSQL listens on 127.0.0.1 only, without a
unix socket, and asks for a password (see `mnist_pipeline.postgres`). MLflow is started through
this module's own interpreter; this module does not import mlflow.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import postgres
from .errors import PipelineError
from .io import write_text
from .processes import (
    free_port,
    log_tail,
    pid_alive,
    port_free,
    read_pid,
    write_pid,
    write_private,
)

DEFAULT_DIR = ".tracking"
DEFAULT_POSTGRES_PORT = 5433
ADMIN_USERNAME = "admin"
TRACKING_DB = "mlflow"
AUTH_DB = "mlflow_auth"
LOCAL_HOSTS = ("localhost", "127.0.0.1")


class ServerError(PipelineError):
    """The MLflow server cannot be started, reached or stopped. (PostgreSQL's own failures,
    on the way, are `postgres.PostgresError`; both are PipelineErrors.)"""


@dataclass(frozen=True)
class ServerPaths:
    """Where the server's folder keeps each thing."""

    root: Path

    @property
    def pgdata(self) -> Path:
        return self.root / "postgres"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def credentials(self) -> Path:
        return self.root / "credentials.json"

    @property
    def auth_ini(self) -> Path:
        return self.root / "auth.ini"

    @property
    def client_env(self) -> Path:
        return self.root / "client.env"

    @property
    def state(self) -> Path:
        return self.root / "server.json"

    @property
    def mlflow_pid(self) -> Path:
        return self.root / "mlflow.pid"

    @property
    def mlflow_log(self) -> Path:
        return self.root / "mlflow.log"

    @property
    def postgres_log(self) -> Path:
        return self.root / "postgres.log"

    @property
    def cluster(self) -> postgres.Cluster:
        return postgres.Cluster(self.pgdata, self.postgres_log)


@dataclass(frozen=True)
class Credentials:
    db_password: str
    admin_password: str
    flask_secret: str
    admin_username: str = ADMIN_USERNAME


@dataclass(frozen=True)
class Server:
    """A running server, as a client sees it."""

    uri: str
    username: str
    password: str
    data_dir: Path
    artifacts_dir: Path
    postgres_port: int
    mlflow_pid: int

    def client_env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.uri, "MLFLOW_TRACKING_USERNAME": self.username,
                "MLFLOW_TRACKING_PASSWORD": self.password}


# --- the folder's files ------------------------------------------------------------------


def load_credentials(paths: ServerPaths) -> Credentials:
    """The folder's secrets, generated and stored (0600) on first use."""
    if paths.credentials.is_file():
        try:
            return Credentials(**json.loads(paths.credentials.read_text()))
        except (ValueError, TypeError) as exc:  # not JSON, or not the fields written
            raise ServerError(f"{paths.credentials} is damaged ({exc}): restore it, or stop the "
                              "server and start anew with another --dir") from None
    creds = Credentials(db_password=secrets.token_urlsafe(24),
                        admin_password=secrets.token_urlsafe(18),
                        flask_secret=secrets.token_hex(32))
    write_private(paths.credentials, json.dumps(creds.__dict__, indent=2) + "\n")
    return creds


def read_state(paths: ServerPaths) -> dict:
    if not paths.state.is_file():
        return {}
    try:
        state = json.loads(paths.state.read_text())
    except ValueError as exc:
        state = exc
    if not isinstance(state, dict):
        raise ServerError(f"{paths.state} is damaged ({state}): restore it, or delete it and "
                          "write the PostgreSQL port set in postgres/postgresql.conf there "
                          "as {\"postgres_port\": PORT}")
    return state


def write_state(paths: ServerPaths, **values: object) -> None:
    write_text(paths.state, json.dumps({**read_state(paths), **values}, indent=2) + "\n")


# --- waiting for the MLflow server -------------------------------------------------------


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def wait_for(ready: Callable[[float], bool], pid: int, log: Path, timeout: float,
             failure: str) -> None:
    """Call `ready` (given the seconds left) until it is true; fail with the log's end if
    `pid` exits first, or with `failure` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if ready(left):
            return
        if not pid_alive(pid):
            raise ServerError(f"the MLflow server exited during start-up; {log_tail(log)}")
        time.sleep(0.3)
    raise ServerError(f"{failure}; {log_tail(log)}")


def wait_healthy(url: str, pid: int, log: Path, timeout: float = 180.0) -> None:
    """Poll `url`/health until it answers; fail with the log's end if `pid` exits first."""
    wait_for(lambda left: healthy(url), pid, log, timeout,
             f"the MLflow server did not answer on {url}/health within {timeout:.0f} s")


def slowest_query(url: str, creds: Credentials, count: int, timeout: float = 60.0) -> float:
    """Seconds that the slowest of `count` simultaneous logged-in queries (as the admin, by
    the name 127.0.0.1, which every server accepts) took to answer; infinity if one got no
    answer (or a server error). A refusal (HTTP 4xx) raises ServerError at once."""
    login = base64.b64encode(f"{creds.admin_username}:{creds.admin_password}".encode())
    headers = {"Authorization": f"Basic {login.decode()}",
               "Host": f"127.0.0.1:{urllib.parse.urlsplit(url).port}"}

    def query(_: int) -> float:
        request = urllib.request.Request(
            f"{url}/api/2.0/mlflow/experiments/search?max_results=1", headers=headers)
        started = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            if exc.code >= 500:  # a worker still setting up: no answer yet
                return float("inf")
            answer = " ".join(exc.read().decode(errors="replace").split())[:200]
            raise ServerError(f"the MLflow server on {url} refused a logged-in query "
                              f"(HTTP {exc.code}: {answer})") from None
        except (OSError, ValueError):
            return float("inf")
        return time.monotonic() - started

    with ThreadPoolExecutor(count) as pool:
        return max(pool.map(query, range(count)))


def warm_up(url: str, creds: Credentials, workers: int, pid: int, log: Path,
            timeout: float = 180.0, quick: float = 3.0) -> None:
    """Query the server, twice as many queries at once as it has workers, until all of them
    answer within `quick` seconds. Each worker sets up its stores on its first request,
    which takes seconds: a client's first query should not wait for that (or time out)."""
    wait_for(lambda left: slowest_query(url, creds, 2 * workers, min(60.0, left)) < quick,
             pid, log, timeout, f"the MLflow server on {url} did not answer logged-in queries "
             f"within {quick:.0f} s after {timeout:.0f} s of start-up")


# --- MLflow ------------------------------------------------------------------------------


def write_client_files(paths: ServerPaths, creds: Credentials, uri: str, pg_port: int) -> None:
    """auth.ini (the auth app's config, its users in PostgreSQL) and client.env (0600)."""
    write_private(paths.auth_ini, (
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {postgres.database_uri(creds.db_password, pg_port, AUTH_DB)}\n"
        f"admin_username = {creds.admin_username}\nadmin_password = {creds.admin_password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"))
    write_private(paths.client_env, (
        f"export MLFLOW_TRACKING_URI={uri}\n"
        f"export MLFLOW_TRACKING_USERNAME={creds.admin_username}\n"
        f"export MLFLOW_TRACKING_PASSWORD={creds.admin_password}\n"))


def allowed_host_list(names: list[str]) -> str:
    """MLflow's --allowed-hosts for `names`: each with and without a port, plus localhost
    (a list given to MLflow replaces its own localhost default)."""
    hosts = [*names, *LOCAL_HOSTS]
    return ",".join(h for name in dict.fromkeys(hosts) for h in (name, f"{name}:*"))


def mlflow_command(paths: ServerPaths, host: str, port: int, allowed_hosts: list[str],
                   workers: int) -> list[str]:
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
           "--workers", str(workers), "--app-name", "basic-auth", "--serve-artifacts",
           "--artifacts-destination", str(paths.artifacts)]
    return cmd + (["--allowed-hosts", allowed_host_list(allowed_hosts)] if allowed_hosts
                  else [])


def mlflow_env(paths: ServerPaths, creds: Credentials, pg_port: int) -> dict[str, str]:
    """The server's environment: the store URI stays off the command line (ps shows it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    store = postgres.database_uri(creds.db_password, pg_port, TRACKING_DB)
    env.update(MLFLOW_BACKEND_STORE_URI=store,
               MLFLOW_AUTH_CONFIG_PATH=str(paths.auth_ini),
               MLFLOW_FLASK_SERVER_SECRET_KEY=creds.flask_secret)
    return env


def local_url(host: str, port: int) -> str:
    """Where this machine reaches a server listening on `host`:`port`."""
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"


def check_port(host: str, port: int) -> None:
    if not port_free(host, port):
        raise ServerError(f"port {port} on {host} is in use by another program: choose "
                          "another with --port")


def start_mlflow(paths: ServerPaths, creds: Credentials, pg_port: int, host: str, port: int,
                 allowed_hosts: list[str], workers: int) -> int:
    """Start `mlflow server` in its own session, logging to mlflow.log; wait until it
    answers /health, then logged-in queries promptly (`warm_up`)."""
    check_port(host, port)  # again: another program may have taken it since start() did
    with open(os.open(paths.mlflow_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
              "ab") as log:
        proc = subprocess.Popen(mlflow_command(paths, host, port, allowed_hosts, workers),
                                cwd=paths.root, env=mlflow_env(paths, creds, pg_port),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
    write_pid(paths.mlflow_pid, proc.pid)
    try:
        wait_healthy(local_url(host, port), proc.pid, paths.mlflow_log)
        warm_up(local_url(host, port), creds, workers, proc.pid, paths.mlflow_log)
    except ServerError:
        stop_mlflow(paths)
        raise
    return proc.pid


def stop_mlflow(paths: ServerPaths, timeout: float = 10.0) -> bool:
    """Stop the MLflow server and its workers (SIGTERM, then SIGKILL); False if not running."""
    pid = read_pid(paths.mlflow_pid, "mlflow")
    if pid is None:
        return False
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not pid_alive(pid):
            break
    paths.mlflow_pid.unlink(missing_ok=True)
    return True


# --- the commands ------------------------------------------------------------------------


def describe(paths: ServerPaths, creds: Credentials, pid: int) -> Server:
    state = read_state(paths)
    return Server(uri=local_url(state["host"], state["port"]), username=creds.admin_username,
                  password=creds.admin_password, data_dir=paths.root,
                  artifacts_dir=paths.artifacts, postgres_port=state["postgres_port"],
                  mlflow_pid=pid)


def running(paths: ServerPaths) -> Server | None:
    """The server started from this folder, if it is up and answers."""
    pid = read_pid(paths.mlflow_pid, "mlflow")
    state = read_state(paths)
    if pid is None or "port" not in state:
        return None
    if not healthy(local_url(state["host"], state["port"])):
        raise ServerError(f"the MLflow server of {paths.root} (pid {pid}) is running but does "
                          f"not answer; see {paths.mlflow_log}, or stop it: "
                          f"{server_command('stop', paths.root)}")
    return describe(paths, load_credentials(paths), pid)


def check_unchanged(paths: ServerPaths, asked: dict[str, object]) -> None:
    """Refuse options that differ from those the running server was started with."""
    state = read_state(paths)
    changed = [f"--{key.replace('_', '-')} {_option(state.get(key))} (asked: {_option(value)})"
               for key, value in asked.items() if state.get(key) != value]
    if changed:
        raise ServerError(f"the server of {paths.root} already runs with "
                          f"{'; '.join(changed)}: to change that, stop it first "
                          f"({server_command('stop', paths.root)})")


def _option(value: object) -> str:
    return (",".join(map(str, value)) or "none") if isinstance(value, list) else str(value)


def start(root: Path, host: str = "127.0.0.1", port: int = 5000,
          allowed_hosts: list[str] | None = None, postgres_port: int | None = None,
          workers: int = 4) -> tuple[Server, bool]:
    """Start PostgreSQL and MLflow for the folder `root` (created on first use).
    Returns the server and whether it was already running."""
    paths = ServerPaths(Path(root).resolve())
    found = running(paths) if paths.root.is_dir() else None
    if found is not None:
        asked = {"host": host, "port": port, "allowed_hosts": allowed_hosts or []}
        if postgres_port is not None:
            asked["postgres_port"] = postgres_port
        check_unchanged(paths, asked)
        return found, True
    check_port(host, port)  # before anything is made
    made = not paths.root.exists()
    try:
        paths.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ServerError(f"cannot make the server's folder {paths.root}: {exc.strerror}: "
                          "choose another --dir") from None
    if os.geteuid() == 0 and made:
        paths.root.chmod(0o711)  # the user postgres walks through to postgres/
    elif os.geteuid() == 0 and not paths.root.stat().st_mode & 0o001:
        raise ServerError(f"{paths.root} must let the user postgres pass through to its "
                          f"postgres/ folder: chmod o+x {paths.root}, or choose a new --dir")
    creds = load_credentials(paths)
    if not postgres.initialised(paths.cluster):
        if paths.pgdata.exists():
            raise ServerError(f"{paths.pgdata} exists but holds no PostgreSQL cluster: move "
                              "it away or choose another --dir")
        pg_port = postgres_port or (DEFAULT_POSTGRES_PORT if port_free(
            "127.0.0.1", DEFAULT_POSTGRES_PORT) else free_port())
        postgres.init(paths.cluster, creds.db_password, pg_port)
        write_state(paths, postgres_port=pg_port)
    pg_port = read_state(paths).get("postgres_port")
    if pg_port is None:
        raise ServerError(f"{paths.state} is missing its postgres_port: write the port set in "
                          f"{paths.pgdata / 'postgresql.conf'} there as \"postgres_port\"")
    postgres_was_up = postgres.running_pid(paths.cluster) is not None
    postgres.start(paths.cluster)
    try:
        postgres.create_databases(creds.db_password, pg_port, (TRACKING_DB, AUTH_DB))
        paths.artifacts.mkdir(mode=0o700, exist_ok=True)  # served to logged-in clients only
        write_client_files(paths, creds, local_url(host, port), pg_port)
        write_state(paths, host=host, port=port, allowed_hosts=allowed_hosts or [])
        pid = start_mlflow(paths, creds, pg_port, host, port, allowed_hosts or [], workers)
    except BaseException:  # a failed (or interrupted) start leaves nothing running
        if not postgres_was_up:
            postgres.stop(paths.cluster)
        raise
    return describe(paths, creds, pid), False


def stop(root: Path) -> list[str]:
    """Stop MLflow, then PostgreSQL; the names of what was running."""
    paths = ServerPaths(Path(root).resolve())
    stopped = ["MLflow"] if stop_mlflow(paths) else []
    if postgres.initialised(paths.cluster) and postgres.stop(paths.cluster):
        stopped.append("PostgreSQL")
    return stopped


def status(root: Path) -> dict[str, object]:
    """What runs for the folder `root`: PIDs, URL, whether MLflow answers."""
    paths = ServerPaths(Path(root).resolve())
    state = read_state(paths)
    mlflow_pid = read_pid(paths.mlflow_pid, "mlflow")
    url = local_url(state["host"], state["port"]) if "port" in state else None
    return {"mlflow_pid": mlflow_pid, "postgres_pid": postgres.running_pid(paths.cluster),
            "url": url, "postgres_port": state.get("postgres_port"),
            "healthy": bool(mlflow_pid and url and healthy(url))}


def status_report(root: Path) -> tuple[list[str], bool]:
    """Two lines on what runs for `root`, and whether both run and MLflow answers."""
    state = status(root)
    mlflow_line = f"running, pid {state['mlflow_pid']}" if state["mlflow_pid"] else "stopped"
    if state["healthy"]:
        mlflow_line += f", answers on {state['url']}"
    pg_line = f"running, pid {state['postgres_pid']}" if state["postgres_pid"] else "stopped"
    if state["postgres_port"]:
        pg_line += f", 127.0.0.1:{state['postgres_port']}"
    return [f"MLflow:     {mlflow_line}", f"PostgreSQL: {pg_line}"], bool(
        state["healthy"] and state["postgres_pid"])


def server_command(action: str, root: Path, default: Path | None = None) -> str:
    """The command that starts, stops... (`action`) the server of `root`: with --dir unless
    `root` is `default`, the folder that a plain `server <action>` would take (always with it
    when no default is given, as in the refusals, which do not know it)."""
    same = default is not None and root.resolve() == default.resolve()
    return f"mnist-pipeline server {action}" + (
        "" if same else f" --dir {shlex.quote(str(root))}")


def start_report(found: Server, already: bool, default_root: Path | None = None) -> str:
    """What `server start` prints: where the server is, how a shell uses it and stops it."""
    return (f"{'Already running' if already else 'Started'}: MLflow tracking server "
            f"{found.uri} (pid {found.mlflow_pid}), PostgreSQL on 127.0.0.1:"
            f"{found.postgres_port}, artifacts in {found.artifacts_dir}\n"
            f"Use it from a shell:  source {found.data_dir / 'client.env'}\n"
            f"  (exports MLFLOW_TRACKING_URI={found.uri} MLFLOW_TRACKING_USERNAME="
            f"{found.username} and MLFLOW_TRACKING_PASSWORD, which is also in "
            f"{found.data_dir / 'credentials.json'})\n"
            f"Stop it: {server_command('stop', found.data_dir, default_root)}")
