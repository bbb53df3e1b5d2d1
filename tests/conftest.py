"""Shared fixtures: tiny IDX files, the real MNIST mirror, and a temporary copy of the project."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import yaml

from mnist_pipeline.idx import encode_idx, parse_idx

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CLI = str(VENV_BIN / "mnist-pipeline")
# What a copy of the project needs to run its pipeline.
PROJECT_FILES = ("dvc.yaml", "params.yaml", "stages", "src", ".dvc/config", ".dvc/.gitignore",
                 ".dvcignore", ".gitignore", "pyproject.toml", "mlruns/README.md",
                 *(f"{folder}/.gitignore" for folder in ("data", "models", "metrics", "plots",
                                                         "reports")))


def mnist_mirror() -> Path:
    """The local MNIST mirror: $MNIST_MIRROR, else ../shared/mnist beside the repository."""
    path = Path(os.environ.get("MNIST_MIRROR") or ROOT.parent / "shared" / "mnist").resolve()
    if not (path / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"real MNIST not found at {path}: set MNIST_MIRROR to a folder "
                    "holding the four MNIST .gz files")
    return path


def load_real(split: str = "t10k", n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8) and labels of the real MNIST `split` ('train' or 't10k')."""
    mirror = mnist_mirror()
    images = parse_idx(gzip.decompress((mirror / f"{split}-images-idx3-ubyte.gz").read_bytes()))
    labels = parse_idx(gzip.decompress((mirror / f"{split}-labels-idx1-ubyte.gz").read_bytes()))
    return images[:n], labels[:n].astype(np.int64)


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    data = encode_idx(array)
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a pipeline subprocess: this venv first, no outside tracking store."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "DVC_", "MNIST_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["MNIST_PUBLIC_MIRRORS"] = "0"
    env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = "test"
    env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = "test@example.com"
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str], check: bool = True,
        timeout: float = 900) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {done.returncode}\n--- stdout\n{done.stdout[-4000:]}"
            f"\n--- stderr\n{done.stderr[-4000:]}")
    return done


def copy_project(dest: Path, env: dict[str, str]) -> Path:
    """A fresh git repository holding the project's pipeline files, committed."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, target)
    run(["git", "init", "-q", "-b", "main"], dest, env)
    run(["git", "add", "-A"], dest, env)
    run(["git", "commit", "-q", "-m", "project"], dest, env)
    return dest


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Poll `url` until it answers 200, failing early if the server process exits."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s")


@contextlib.contextmanager
def answering_server(answer: Callable[[Any], tuple[int, bytes]]) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 that answers each GET with `answer(request)`: (status,
    body), the request being http.server's handler (path, headers). Yields its base URL;
    shut down on leaving."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            code, body = answer(self)
            self.send_response(code)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # keep test output clean
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


# --- One real pipeline run, shared by the end-to-end tests ---------------------------------


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """A project copy after `dvc repro compute-stats` (twice) and `dvc exp run` of 1 epoch."""
    env = clean_env(MNIST_MIRROR=str(mnist_mirror()))
    repo = copy_project(tmp_path_factory.mktemp("e2e") / "repo", env)
    log = {"first": run(["dvc", "repro", "compute-stats"], repo, env)}
    log["second"] = run(["dvc", "repro", "compute-stats"], repo, env)
    log["status"] = run(["dvc", "status", "compute-stats"], repo, env)
    log["git_after_repro"] = run(["git", "status", "--porcelain"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-q", "-m", "data"], repo, env)
    log["exp"] = run(["dvc", "exp", "run", "-S", "train.epochs=1"], repo, env)
    log["git_after_exp"] = run(["git", "status", "--porcelain"], repo, env)
    return repo, env, log


@pytest.fixture(scope="session")
def client(pipeline):
    from mlflow import MlflowClient

    repo, _, _ = pipeline
    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")


@pytest.fixture(scope="session")
def run_info(pipeline):
    repo, _, _ = pipeline
    return json.loads((repo / "models" / "run.json").read_text())


def load_script(path: Path) -> ModuleType:
    """A script (e.g. bench/report.py) as a module; what it adds to sys.path is undone."""
    import importlib.util

    saved = list(sys.path)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.path[:] = saved
    return module


# --- The promotion lifecycle on that run, shared by the registry and UI tests ------------


def _set_floor(repo: Path, floor: float) -> None:
    path = repo / "params.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["promote"]["min_accuracy"] = floor
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests of the promotion lifecycle last, whatever order they were given in: its fixture
    trains a second version in the `pipeline` project, whose first run's outputs (metrics,
    models/run.json) the other tests read."""
    items.sort(key=lambda item: "promotions" in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session")
def promotions(pipeline, run_info, client):
    """The promotion lifecycle, step by step: each command's result, in order."""
    repo, env, _ = pipeline
    steps: dict[str, Any] = {}

    def cli(name: str, *args: str) -> None:
        steps[name] = run([CLI, *args], repo, env, check=False)

    steps["v1_report"] = json.loads((repo / "metrics" / "evaluate.json").read_text())
    _set_floor(repo, 0.999)  # above what one epoch reaches, whatever the recipe
    cli("below_floor", "promote")
    cli("models_before", "models", "--json")
    _set_floor(repo, 0.05)  # lower the floor through params
    cli("promote_v1", "promote")
    steps["tags_v1"] = client.get_model_version("mnist-cnn", str(run_info["version"])).tags
    # a second, worse version (above the floor, below the champion): 2,000 images only
    steps["second_run"] = run(["dvc", "exp", "run", "-S", "train.train_subset=2000",
                               "-S", "train.val_size=0", "-S", "train.select_best=false"],
                              repo, env)
    cli("worse_refused", "promote")  # default candidate is now the new version
    cli("force_without_reason", "promote", "--force")
    cli("forced", "promote", "--force", "--reason", "testing a forced promotion")
    cli("rollback", "rollback")
    cli("rollback_again", "rollback")
    cli("history", "history", "--json")
    cli("models", "models", "--json")
    cli("models_table", "models")
    cli("unknown_version", "promote", "--version", "99")
    cli("unknown_run", "promote", "--run-id", "0123456789abcdef")
    cli("unknown_model", "promote", "--name", "no-such-model", "--version", "1")
    return steps


# --- A shared MLflow tracking server on PostgreSQL, started like `mnist-pipeline server` ----


def postgres_or_skip() -> None:
    """Skip, saying why, where the PostgreSQL server programs cannot be had (`.ci/run`
    installs them on Debian)."""
    from mnist_pipeline import postgres

    try:
        postgres.find_program("initdb")
    except postgres.PostgresError as exc:
        pytest.skip(str(exc))
    if os.geteuid() == 0 and (shutil.which("runuser") is None or _no_user("postgres")):
        pytest.skip("running as root, PostgreSQL needs runuser and the user `postgres`")


def _no_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return True
    return False


def reachable_tmp_dir(prefix: str) -> Path:
    """A new folder in the system temp dir that other users can walk through (not list):
    as root, PostgreSQL runs as `postgres`, which cannot enter pytest's 0700 tmp_path."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o711)
    return path


class TrackingServer:
    """The session's tracking server: what a client needs, and PostgreSQL's own stop and
    start for fault tests."""

    def __init__(self, found: Any, paths: Any) -> None:
        self.uri: str = found.uri
        self.username: str = found.username
        self.password: str = found.password
        self.data_dir: Path = found.data_dir
        self.artifacts_dir: Path = found.artifacts_dir
        self.postgres_port: int = found.postgres_port
        self.mlflow_pid: int = found.mlflow_pid
        self.paths = paths

    def env(self, **extra: str) -> dict[str, str]:
        """clean_env() pointed at this server, logged in as the admin."""
        return clean_env(MLFLOW_TRACKING_URI=self.uri, MLFLOW_TRACKING_USERNAME=self.username,
                         MLFLOW_TRACKING_PASSWORD=self.password, **extra)

    def stop_postgres(self) -> None:
        from mnist_pipeline import postgres

        postgres.stop(self.paths.cluster)

    def start_postgres(self) -> None:
        from mnist_pipeline import postgres

        postgres.start(self.paths.cluster)


@pytest.fixture(scope="session")
def tracking_server():
    """`mlflow server` with basic auth and proxied artifacts on a throwaway PostgreSQL, both
    stopped by PID at the end of the session, whatever happened."""
    from mnist_pipeline import server

    postgres_or_skip()
    base = reachable_tmp_dir("mnist-tracking-")
    root = base / "server"
    try:
        found, _ = server.start(root, port=free_port(), postgres_port=free_port(), workers=2)
        yield TrackingServer(found, server.ServerPaths(root))
    finally:
        server.stop(root)
        shutil.rmtree(base, ignore_errors=True)
