"""Two experiments at once on the local SQLite store: both finish and both reach MLflow."""

from __future__ import annotations

import pytest

from .conftest import clean_env, copy_project, mnist_mirror, run

pytestmark = pytest.mark.e2e


def test_two_queued_experiments_run_in_parallel(tmp_path):
    from mlflow import MlflowClient

    env = clean_env(MNIST_MIRROR=str(mnist_mirror()))
    repo = copy_project(tmp_path / "repo", env)
    run(["dvc", "repro", "compute-stats"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-q", "-m", "data"], repo, env)
    for seed in (1, 2):
        run(["dvc", "exp", "run", "--queue", "-S", "train.epochs=1", "-S",
             "train.train_subset=1000", "-S", "train.val_size=0", "-S",
             "train.select_best=false", "-S", f"train.seed={seed}"], repo, env)
    done = run(["dvc", "exp", "run", "--run-all", "-j", "2"], repo, env, timeout=1200)
    assert "database is locked" not in done.stdout + done.stderr

    shown = run(["dvc", "exp", "show", "--json"], repo, env).stdout
    assert '"seed": 1' in shown and '"seed": 2' in shown
    client = MlflowClient(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mnist-cnn").experiment_id])
    assert sorted(r.data.params["seed"] for r in runs) == ["1", "2"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert all(r.data.tags.get("DVC_EXP_NAME") for r in runs)
    versions = client.search_model_versions("name='mnist-cnn'")
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in runs)
    # evaluation of each experiment reached its own run
    assert all("test_accuracy" in r.data.metrics for r in runs)
