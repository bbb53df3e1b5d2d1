"""Where runs are stored, and the null tracker."""

from __future__ import annotations

from pathlib import Path

import pytest

from mnist_pipeline.io import repo_root
from mnist_pipeline.tracking import NullTracker, git_state, resolve_tracking

from .conftest import answering_server


def test_default_store_is_sqlite_in_the_repository(tmp_path):
    uri, artifacts = resolve_tracking({}, tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    assert artifacts == (tmp_path.resolve() / "mlruns" / "artifacts").as_uri()


def test_dvc_root_wins_over_a_temporary_copy(tmp_path):
    # `dvc exp run --temp` runs in a copy but sets DVC_ROOT to the real repository
    assert repo_root({"DVC_ROOT": str(tmp_path)}, "/elsewhere") == tmp_path.resolve()


def test_the_store_is_the_dvc_repositorys_from_any_folder_inside_it(tmp_path):
    (tmp_path / ".dvc").mkdir()
    inside = tmp_path / "src" / "deeper"
    inside.mkdir(parents=True)
    assert repo_root({}, inside) == tmp_path.resolve()
    uri, _ = resolve_tracking({}, inside)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    outside = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    outside.mkdir()
    assert repo_root({}, outside) == outside.resolve()  # no repository: the folder itself


def test_environment_overrides_the_store(tmp_path):
    assert resolve_tracking({"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}, tmp_path) == (
        "http://127.0.0.1:5000", None)
    # a SQLite store's artifacts go beside its database, wherever the command runs
    for uri in (f"sqlite:///{tmp_path}/team/mlflow.db", "sqlite:///team/mlflow.db"):
        assert resolve_tracking({"MLFLOW_TRACKING_URI": uri}, tmp_path) == (
            uri, (tmp_path.resolve() / "team" / "artifacts").as_uri())


def test_null_tracker_accepts_everything():
    tracker = NullTracker()
    with tracker.run(tags={"a": "b"}) as t:
        t.log_params({"x": 1})
        t.log_metrics({"loss": 0.5}, step=1)
        t.set_tags({"k": "v"})
        t.log_dict({"a": 1}, "a.json")
        t.log_artifact(Path(__file__))
    assert tracker.run_id is None


def test_git_state_outside_a_repository(tmp_path):
    assert git_state(tmp_path) == {}


@pytest.mark.parametrize("interrupt, status", [(KeyboardInterrupt, "KILLED"),
                                               (RuntimeError, "FAILED")])
def test_run_status_on_errors(tmp_path, interrupt, status):
    from mlflow import MlflowClient

    from mnist_pipeline.tracking import MlflowTracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = MlflowTracker(uri, "exp", (tmp_path / "artifacts").as_uri())
    with pytest.raises(interrupt), tracker.run():
        raise interrupt()
    assert MlflowClient(uri).get_run(tracker.run_id).info.status == status


def test_a_checked_server_is_not_checked_again_when_the_run_starts(monkeypatch):
    """The train stage checks the server before any work; starting the run must not repeat
    the check (with its login query's long wait) against the same server."""
    from mnist_pipeline.tracking import MlflowTracker, TrackingError

    health = []

    def answer(request):
        health.extend([request.path] if request.path == "/health" else [])
        if request.path == "/health" or "experiments/search" in request.path:
            return 200, b'{"experiments": []}'
        return 503, b"{}"

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with answering_server(answer) as url:
        tracker = MlflowTracker(url, "exp")
        tracker.check()
        with pytest.raises(TrackingError, match="cannot use the MLflow tracking store"), \
                tracker.run():  # the server fails the experiment lookup
            pass
    assert health == ["/health"]


@pytest.mark.parametrize("store, fault", [
    ("a-folder", "maintenance mode"),  # a plain path: MLflow's retired file store
    ("nosuch://x", "unsupported URI"),
    ("sqlite:///{tmp}/not-a-database.db", "file is not a database"),
])
def test_a_store_mlflow_cannot_open_is_one_message(tmp_path, store, fault):
    from mnist_pipeline.tracking import TrackingError, open_client

    (tmp_path / "not-a-database.db").write_text("plain text")
    uri = store.format(tmp=tmp_path)
    with pytest.raises(TrackingError, match=f"cannot open the MLflow tracking store {uri}: "
                                            f".*{fault}.*MLFLOW_TRACKING_URI"):
        open_client(uri)
