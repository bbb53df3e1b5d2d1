"""MLflow tracking: where the store is, the run lifecycle, params, metrics, tags, artifacts.

With `registry.py` (models: logging, registering, aliases) it is the only module that imports
mlflow (tests/test_layout.py checks it). `NullTracker` has the same methods and does nothing,
for tests and runs without tracking. Nothing here runs at import time; callers pass the
environment explicitly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import PipelineError
from .io import repo_root

DEFAULT_STORE_DIR = "mlruns"


class TrackingError(PipelineError):
    """The tracking store cannot be used."""


def resolve_tracking(env: Mapping[str, str], cwd: str | Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location for new experiments or None for the server's own).
    A SQLite store keeps its artifacts beside its database, in artifacts/, as the default
    store does (MLflow's own default is ./mlruns of whatever folder a command runs in)."""
    uri = env.get("MLFLOW_TRACKING_URI", "").strip()
    if uri and (database := sqlite_file(uri)) is not None:
        return uri, ((Path(cwd) / database).resolve().parent / "artifacts").as_uri()
    if uri:
        return uri, None
    store = repo_root(env, cwd) / DEFAULT_STORE_DIR
    return f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()


def sqlite_file(uri: str) -> Path | None:
    """The database file of a local SQLite store's URI, or None for any other store."""
    prefix = "sqlite:///"
    return Path(uri.removeprefix(prefix)) if uri.startswith(prefix) else None


def open_client(uri: str, registry_uri: str | None = None) -> Any:
    """An MlflowClient on the store at `uri`; one that MLflow cannot open (an unknown scheme,
    a plain folder, a file that is not a database) is a TrackingError naming it."""
    from mlflow import MlflowClient

    try:
        return MlflowClient(tracking_uri=uri, registry_uri=registry_uri)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        reason = reason if len(reason) <= 300 else reason[:297].rstrip() + "..."
        raise TrackingError(
            f"cannot open the MLflow tracking store {uri}: {reason}. Set MLFLOW_TRACKING_URI "
            "to a store (sqlite:///path/to/mlflow.db or http://host:port), or unset it to use "
            "./mlruns.") from None


def store_client(uri: str) -> Any:
    """An MlflowClient on the store at `uri` (a server is checked first: reachable, login
    accepted), also made the default store of this process (for `models:/` URIs loaded
    through mlflow.pyfunc)."""
    import mlflow

    if uri.startswith(("http://", "https://")):
        MlflowTracker(uri, "").check()
    client = open_client(uri)
    mlflow.set_tracking_uri(uri)
    return client


def git_state(cwd: str | Path) -> dict[str, str]:
    """The commit checked out in `cwd` and whether the tree has uncommitted changes."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    return {"git_commit": commit, "git_dirty": str(bool(git("status", "--porcelain"))).lower()}


def file_md5s(paths: list[Path]) -> dict[str, str]:
    out = {}
    for path in paths:
        digest = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(2**20), b""):
                digest.update(block)
        out[path.name] = digest.hexdigest()
    return out


def params_hash(params: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def check_login(uri: str, timeout: float = 30.0) -> None:
    """Fail, in one line naming the URI and the variables, when the server at `uri` refuses
    the login MLflow sends (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, or none)."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    creds = get_default_host_creds(uri)
    try:
        response = http_request(creds, "/api/2.0/mlflow/experiments/search", "GET",
                                params={"max_results": 1}, max_retries=0, timeout=timeout)
    except Exception as exc:  # no answer: refused, reset, timed out (after `timeout` s), TLS
        cause = " ".join(str(exc).split())[:200]
        raise TrackingError(f"the MLflow tracking server {uri} did not answer a query "
                            f"({type(exc).__name__}: {cause})") from None
    if response.status_code == 403 and "host" in response.text.lower():
        raise TrackingError(f"the MLflow tracking server {uri} refused this address "
                            f"({response.text.strip()[:100]}): reach it by a name it was started "
                            "with (mnist-pipeline server --allowed-hosts)")
    if response.status_code in (401, 403):
        given = "no login was given" if not creds.username else f"user {creds.username!r}"
        raise TrackingError(
            f"the MLflow tracking server {uri} refused the login (HTTP {response.status_code}; "
            f"{given}): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an "
            "account of that server")


def store_name(uri: str) -> str:
    """`uri` as recorded with a registered version: without a password, if one is in it."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class NullTracker:
    """The tracker interface, doing nothing: for tests and runs without tracking."""

    run_id: str | None = None

    @contextlib.contextmanager
    def run(self, run_name: str | None = None, tags: Mapping[str, str] | None = None,
            run_id: str | None = None) -> Iterator[NullTracker]:
        yield self

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_dict(self, obj: Any, name: str) -> None:
        pass

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        pass

    def log_figure(self, figure: Any, name: str) -> None:
        pass

    def log_image(self, image: Any, name: str) -> None:
        pass

    def logged_steps(self, key: str) -> set[int]:
        return set()

    def log_dataset(self, features: Any, targets: Any, name: str, source: str, digest: str,
                    context: str = "training") -> None:
        pass


class MlflowTracker(NullTracker):
    """Tracks one run at a time in the MLflow store at `uri`, under `experiment`."""

    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None) -> None:
        self.uri, self.experiment, self.artifact_location = uri, experiment, artifact_location
        self.run_id = None
        self.pending: list[Any] = []  # metrics not yet accepted by the store
        self.warned = False
        self.checked = False  # check() passed: runs do not check the store again

    def check(self, timeout: float = 5.0) -> None:
        """Fail fast, naming the URI, when the store cannot be reached (before any work)."""
        if self.uri.startswith(("http://", "https://")):
            try:
                with urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=timeout):
                    pass
            except (OSError, ValueError) as exc:
                reason = getattr(exc, "reason", exc)
                raise TrackingError(
                    f"the MLflow tracking server {self.uri} is unreachable ({reason}). Start "
                    "it, point MLFLOW_TRACKING_URI at a running one, or unset it to use ./mlruns."
                ) from None
            check_login(self.uri)  # with its own, longer wait: a query can take seconds
        elif (database := sqlite_file(self.uri)) is not None:
            folder = database.parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise TrackingError(f"cannot create the MLflow store folder {folder}: "
                                    f"{exc.strerror}") from None
        self.checked = True

    def _experiment_id(self) -> str:
        import mlflow

        if not self.checked:
            self.check()
        mlflow.set_tracking_uri(self.uri)
        with self._store_lock():
            return self._get_or_create_experiment()

    @contextlib.contextmanager
    def _store_lock(self) -> Iterator[None]:
        """Serialise first use of a local SQLite store: two runs starting at once (e.g.
        `dvc exp run --run-all -j 2`) would otherwise race to create its tables."""
        path = sqlite_file(self.uri)
        if path is None:
            yield
            return
        from filelock import FileLock

        with FileLock(str(path.with_suffix(".lock"))):
            yield

    def _get_or_create_experiment(self) -> str:
        import mlflow

        try:
            found = mlflow.get_experiment_by_name(self.experiment)
            if found is not None:
                return found.experiment_id
            try:
                return mlflow.create_experiment(
                    self.experiment, artifact_location=self.artifact_location
                )
            except mlflow.exceptions.MlflowException:
                # another run (e.g. a parallel `dvc exp run`) created it first
                found = mlflow.get_experiment_by_name(self.experiment)
                if found is None:
                    raise
                return found.experiment_id
        except Exception as exc:  # any failure to reach the store is the user's to fix
            raise TrackingError(
                f"cannot use the MLflow tracking store {self.uri}: {exc}. Set "
                "MLFLOW_TRACKING_URI to a reachable server, or unset it to use ./mlruns."
            ) from None

    @contextlib.contextmanager
    def run(self, run_name: str | None = None, tags: Mapping[str, str] | None = None,
            run_id: str | None = None) -> Iterator[MlflowTracker]:
        """Start (or continue) a run; mark it FAILED on an error and KILLED on Ctrl-C."""
        import mlflow

        experiment_id = self._experiment_id()
        active = mlflow.start_run(
            run_id=run_id, experiment_id=None if run_id else experiment_id,
            run_name=run_name, tags=dict(tags or {}),
        )
        self.run_id = active.info.run_id
        status = "FINISHED"
        try:
            yield self
            self.flush(strict=True)
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except BaseException:
            status = "FAILED"
            raise
        finally:
            try:
                mlflow.end_run(status)
            except Exception:  # the store is gone; the error that matters is already raised
                if status == "FINISHED":
                    raise TrackingError(f"cannot close run {self.run_id} at {self.uri}: the "
                                        "store is unreachable") from None

    def attach(self, run_id: str) -> MlflowTracker:
        """Log to an existing run (e.g. evaluation results to the training run)."""
        import mlflow

        mlflow.set_tracking_uri(self.uri)  # for model loading through the registry too
        try:
            self.client().get_run(run_id)
        except Exception as exc:
            raise TrackingError(f"MLflow run {run_id} not found in {self.uri}: {exc}") from None
        self.run_id = run_id
        return self

    def client(self) -> Any:
        return open_client(self.uri)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        self.client().log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log now if the store answers; else keep them and send them with the next call."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.flush(strict=False)

    def flush(self, strict: bool) -> None:
        """Send the metrics kept while the store was unreachable (raise if strict and down)."""
        if not self.pending:
            return
        try:
            for start in range(0, len(self.pending), 1000):  # MLflow's batch limit
                self.client().log_batch(self.run_id, metrics=self.pending[start : start + 1000])
        except Exception as exc:
            if strict:
                raise TrackingError(
                    f"the MLflow store {self.uri} is unreachable ({type(exc).__name__}); "
                    f"{len(self.pending)} metric values could not be sent. Weights and "
                    "checkpoint are kept: re-run when the store is back to log and register."
                ) from None
            if not self.warned:
                print(f"warning: the MLflow store {self.uri} is unreachable; metrics are kept "
                      "and sent when it returns", file=sys.stderr, flush=True)
                self.warned = True
            return
        self.pending = []

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client().log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dict(self, obj: Any, name: str) -> None:
        self.client().log_dict(self.run_id, obj, name)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.client().log_artifact(self.run_id, str(path), artifact_path=folder)

    def log_figure(self, figure: Any, name: str) -> None:
        self.client().log_figure(self.run_id, figure, name)

    def log_image(self, image: Any, name: str) -> None:
        """A PIL image (or array) as the artifact `name` (a path ending .png)."""
        self.client().log_image(self.run_id, image, artifact_file=name)

    def logged_steps(self, key: str) -> set[int]:
        """The steps at which metric `key` was logged to the current run."""
        return {m.step for m in self.client().get_metric_history(self.run_id, key)}

    def log_dataset(self, features: Any, targets: Any, name: str, source: str, digest: str,
                    context: str = "training") -> None:
        """The arrays a run trained on as an MLflow dataset input (schema, profile, source
        and `digest`), to the current run."""
        import warnings

        import mlflow

        with warnings.catch_warnings():  # MLflow registers its local source type twice
            warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways")
            dataset = mlflow.data.from_numpy(features, source=source, targets=targets,
                                             name=name, digest=digest)
        mlflow.log_input(dataset, context=context)
