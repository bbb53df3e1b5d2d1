"""Everything MLflow: where the store is, run lifecycle, params/metrics/tags, model logging.

No other module imports mlflow. `NullTracker` has the same methods and does nothing, for tests
and dry runs. Nothing here runs at import time; callers pass the environment explicitly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import PipelineError

DEFAULT_STORE_DIR = "mlruns"


class TrackingError(PipelineError):
    """The tracking store cannot be used."""


def store_root(env: Mapping[str, str], cwd: str | Path) -> Path:
    """The repository whose mlruns/ holds the local store.

    DVC sets DVC_ROOT to the main repository even when an experiment runs in a temporary
    copy (`dvc exp run --temp/--queue`), so every run lands in the same store.
    """
    return Path(env.get("DVC_ROOT") or cwd).resolve()


def resolve_tracking(env: Mapping[str, str], cwd: str | Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location for new experiments or None for the server's own)."""
    uri = env.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri, None
    store = store_root(env, cwd) / DEFAULT_STORE_DIR
    return f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()


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


class MlflowTracker(NullTracker):
    """Tracks one run at a time in the MLflow store at `uri`, under `experiment`."""

    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None) -> None:
        self.uri, self.experiment, self.artifact_location = uri, experiment, artifact_location
        self.run_id = None

    def _experiment_id(self) -> str:
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        try:
            found = mlflow.get_experiment_by_name(self.experiment)
            if found is not None:
                return found.experiment_id
            return mlflow.create_experiment(
                self.experiment, artifact_location=self.artifact_location
            )
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
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except BaseException:
            status = "FAILED"
            raise
        finally:
            mlflow.end_run(status)

    def log_params(self, params: Mapping[str, Any]) -> None:
        import mlflow

        mlflow.log_params({k: str(v) for k, v in params.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        import mlflow

        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_dict(self, obj: Any, name: str) -> None:
        import mlflow

        mlflow.log_dict(obj, name)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=folder)
