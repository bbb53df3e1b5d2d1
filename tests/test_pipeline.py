"""End to end: the real pipeline (dvc repro / dvc exp run) on real MNIST, in a temporary git
repository with its own MLflow store. One short training run is shared by the tests here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from mnist_pipeline.model import DeployableModel, MnistCNN

from .conftest import load_real, run

pytestmark = pytest.mark.e2e


def test_stats_of_real_mnist(pipeline):
    repo, _, _ = pipeline
    stats = json.loads((repo / "data" / "stats.json").read_text())
    assert round(stats["mean"], 4) == 0.1307 and round(stats["std"], 4) == 0.3081
    assert stats["train"]["images"] == 60000 and stats["test"]["images"] == 10000
    assert sum(stats["train"]["per_class"].values()) == 60000
    assert stats["test"]["per_class"]["1"] == 1135


def test_second_repro_changes_nothing(pipeline):
    _, _, log = pipeline
    assert "Running stage" not in log["second"].stdout
    assert "didn't change" in log["second"].stdout
    assert "up to date" in log["status"].stdout


def test_the_committed_gitignore_files_already_ignore_every_output(pipeline):
    """A clone's first `dvc repro` leaves no .gitignore for the user to commit: only the lock
    file (and the params an experiment set) change."""
    _, _, log = pipeline
    assert log["git_after_repro"].stdout.split() == ["??", "dvc.lock"]
    changed = {line[3:] for line in log["git_after_exp"].stdout.splitlines()}
    assert changed == {"dvc.lock", "params.yaml"}, log["git_after_exp"].stdout


def test_metrics_show(pipeline):
    repo, env, _ = pipeline
    shown = run(["dvc", "metrics", "show", "--json"], repo, env).stdout
    assert shown.count('"test_accuracy"') == 1  # one test accuracy: the evaluate stage's
    # what runs are compared by; per-class scores and dataset counts are reports, not metrics
    assert "per_class" not in shown and "mean" not in shown and "device" not in shown
    table = run(["dvc", "metrics", "show"], repo, env).stdout
    assert "test_accuracy" in table and max(len(line) for line in table.splitlines()) < 200


def test_exp_run_trains_one_epoch(pipeline):
    repo, _, log = pipeline
    metrics = json.loads((repo / "metrics" / "train.json").read_text())
    assert metrics["epochs"] == 1 and set(metrics) == {
        "train_loss", "train_accuracy", "epochs", "duration_seconds"}  # numbers to compare
    assert metrics["train_accuracy"] >= 0.9
    assert not any(key.startswith("test_") for key in metrics)  # scored by evaluate only
    history = json.loads((repo / "plots" / "train_history.json").read_text())
    assert [row["epoch"] for row in history] == [1]
    assert "Epoch: 1, Loss:" in log["exp"].stdout


def test_evaluate_outputs_agree_with_mlflow(pipeline, client, run_info):
    repo, env, _ = pipeline
    report = json.loads((repo / "reports" / "evaluation.json").read_text())
    headline = json.loads((repo / "metrics" / "evaluate.json").read_text())
    assert headline == {k: report[k] for k in ("test_accuracy", "test_loss", "macro_f1")}
    assert report["test_accuracy"] >= 0.98
    assert set(report["per_class"]) == {str(d) for d in range(10)}
    assert sum(r["support"] for r in report["per_class"].values()) == 10000
    confusion = json.loads((repo / "plots" / "confusion.json").read_text())
    assert len(confusion) == 10000 and set(confusion[0]) == {"actual", "predicted"}
    wrong = sum(r["actual"] != r["predicted"] for r in confusion)
    assert wrong == round((1 - report["test_accuracy"]) * 10000)
    assert (repo / "plots" / "misclassified.png").read_bytes()[:4] == b"\x89PNG"

    mlrun = client.get_run(run_info["run_id"])
    # the one scoring of the test set, under one name per number
    tested = {k: v for k, v in mlrun.data.metrics.items() if "test" in k or "f1" in k}
    assert tested == pytest.approx({k: report[k] for k in ("test_accuracy", "test_loss",
                                                           "macro_f1")})
    assert [p.step for p in client.get_metric_history(run_info["run_id"], "test_accuracy")] \
        == [0]
    artifacts = {a.path for a in client.list_artifacts(run_info["run_id"], "evaluation")}
    assert {"evaluation/misclassified.png", "evaluation/confusion_matrix.png",
            "evaluation/report.json"} <= artifacts
    version = client.get_model_version("mnist-cnn", str(run_info["version"]))
    assert float(version.tags["test_accuracy"]) == pytest.approx(report["test_accuracy"])

    plots = json.loads(run(["dvc", "plots", "show", "--json"], repo, env).stdout)["data"]
    assert set(plots) == {"Training loss", "Training accuracy", "Learning rate",
                          "plots/confusion.json", "plots/confusion.png",
                          "plots/misclassified.png", "plots/train_curves.png"}
    for name in ("confusion.png", "misclassified.png", "train_curves.png"):
        assert (repo / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    diff = run(["dvc", "metrics", "diff", "--json"], repo, env).stdout
    assert "metrics/evaluate.json" in diff


def test_mlflow_run_is_complete(pipeline, client, run_info):
    repo, _, _ = pipeline
    mlrun = client.get_run(run_info["run_id"])
    assert mlrun.info.status == "FINISHED"
    defaults = yaml.safe_load((repo / "params.yaml").read_text())["train"]
    assert mlrun.data.params["epochs"] == "1"
    assert float(mlrun.data.params["lr"]) == defaults["lr"]
    assert float(mlrun.data.params["stats.mean"]) == pytest.approx(0.1307, abs=1e-4)
    for key in ("train_loss", "lr", "epoch_seconds", "train_accuracy"):  # the "epoch" section
        points = client.get_metric_history(run_info["run_id"], f"epoch/{key}")
        assert [p.step for p in points] == [1], key
    metrics = json.loads((repo / "metrics" / "train.json").read_text())
    assert mlrun.data.metrics["epoch/train_loss"] == pytest.approx(metrics["train_loss"])
    tags = mlrun.data.tags
    assert len(tags["git_commit"]) == 40 and tags["git_dirty"] in {"true", "false"}
    assert tags["openmp_wait"] == "GOMP_SPINCOUNT=1000"  # set by the stage before torch loads
    # the training data as a dataset input (the UI's Dataset column)
    (dataset,) = mlrun.inputs.dataset_inputs
    assert dataset.dataset.name == "mnist-train" and len(dataset.dataset.digest) == 8
    assert "data/raw" in dataset.dataset.source
    assert {t.key: t.value for t in dataset.tags}["mlflow.data.context"] == "training"
    assert json.loads(dataset.dataset.profile)["features_shape"] == [60000, 28, 28]
    # named after the DVC experiment, described in words (the UI's description field)
    assert mlrun.info.run_name == tags["DVC_EXP_NAME"]
    note = tags["mlflow.note.content"]
    assert note.startswith("**1 epoch** of adam") and tags["git_commit"][:12] in note
    assert tags["data_md5.train-images-idx3-ubyte"][:8] in note
    assert tags["DVC_EXP_NAME"] and len(tags["DVC_EXP_BASELINE_REV"]) == 40
    assert tags["data_md5.train-images-idx3-ubyte"] == "6bbc9ace898e44ae57da46a324031adb"
    assert tags["device"] == "cpu" and tags["torch_version"].startswith("2.")
    # the store is inside the repository, with artifacts beside it
    assert (repo / "mlruns" / "artifacts").is_dir()


def test_registered_version_points_at_the_run(client, run_info):
    version = client.get_model_version(run_info["registered_model"], str(run_info["version"]))
    assert version.run_id == run_info["run_id"]
    assert run_info["registry_uri"] == f"models:/mnist-cnn/{run_info['version']}"


@pytest.mark.parametrize("batch", [1, 37])
def test_registered_model_predicts_like_the_trained_one(pipeline, run_info, batch, monkeypatch):
    import mlflow

    repo, _, _ = pipeline
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    loaded = mlflow.pyfunc.load_model(run_info["registry_uri"])
    images, _ = load_real("t10k", batch)
    pixels = images[:, None].astype(np.float32) / 255.0
    served = loaded.predict(pixels)

    net = MnistCNN()
    net.load_state_dict(torch.load(repo / "models" / "model.pt", weights_only=True))
    stats = json.loads((repo / "data" / "stats.json").read_text())
    tta = yaml.safe_load((repo / "params.yaml").read_text())["train"]["tta"]
    expected = DeployableModel(net, stats["mean"], stats["std"], tta).eval()(
        torch.from_numpy(pixels))
    assert served.shape == (batch, 10)
    np.testing.assert_allclose(served, expected.detach().numpy(), atol=1e-5)
    # the exported graph kept the channels-last weights (fast CPU inference)
    weights = [p for p in loaded.unwrap_python_model().network.parameters() if p.dim() == 4]
    assert len(weights) == 3
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
