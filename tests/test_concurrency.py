"""Two experiments at once on the local SQLite store: both finish and both reach MLflow."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml

from .conftest import ROOT, clean_env, copy_project, mnist_mirror, run

pytestmark = pytest.mark.e2e


def test_two_queued_experiments_run_in_parallel(tmp_path):
    from mlflow import MlflowClient

    env = clean_env(MNIST_MIRROR=str(mnist_mirror()))
    repo = copy_project(tmp_path / "repo", env)
    doc = yaml.safe_load((repo / "params.yaml").read_text())
    doc["train"].update(epochs=1, train_subset=1000)
    (repo / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    run(["dvc", "repro", "compute-stats"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-q", "-m", "data"], repo, env)
    for seed in (1, 2):
        run(["dvc", "exp", "run", "--queue", "-S", f"train.seed={seed}"], repo, env)
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
    # each run is named after its DVC experiment
    assert all(r.info.run_name == r.data.tags["DVC_EXP_NAME"] for r in runs)

    # `make compare` fits a 120-column terminal: both accuracies, nothing elided
    flags = re.search(r"^COMPARE := (.*)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    table = run(["dvc", "exp", "show", "--no-pager", *shlex.split(flags)], repo,
                {**env, "COLUMNS": "120"}).stdout
    assert "…" not in table and "test_accuracy" in table and "train.seed" in table
    assert all(len(line) <= 120 for line in table.splitlines())
    for r in runs:
        assert f"{r.data.metrics['test_accuracy']:.4f}".rstrip("0") in table
    names = [r.data.tags["DVC_EXP_NAME"] for r in runs]
    assert all(name in table for name in names)
