"""The training loop on real MNIST (a subset): options, metrics and CPU determinism."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mnist_pipeline.io import read_json
from mnist_pipeline.params import TrainParams
from mnist_pipeline.tracking import NullTracker
from mnist_pipeline.train import build_state, fit, select_device, to_tensor
from mnist_pipeline.train_workflow import TrainOutputs, run_training

from .conftest import load_real, mnist_mirror

SMALL = TrainParams(epochs=2, train_subset=1000, batch_size=50)


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    from mnist_pipeline.download import download

    out = tmp_path_factory.mktemp("raw") / "raw"
    download(out, [str(mnist_mirror())])
    return out


@pytest.fixture(scope="module")
def subset():
    images, labels = load_real("train", 600)
    return to_tensor(images, 0.1307, 0.3081, torch.device("cpu")), torch.from_numpy(labels)


def _fit(params, subset):
    state = build_state(params, torch.device("cpu"))
    seen = []
    history = fit(state, params, *subset, on_epoch_end=lambda e, m: seen.append((e, m)))
    return state, history, seen


def test_fit_reports_each_epoch_and_learns(subset):
    state, history, seen = _fit(SMALL, subset)
    assert [e for e, _ in seen] == [1, 2] and state.epoch == 2
    assert set(history[0]) >= {"epoch", "train_loss", "last_batch_loss", "train_accuracy",
                               "lr", "epoch_seconds"}
    assert history[1]["train_loss"] < history[0]["train_loss"]


@pytest.mark.parametrize("option", [
    {"channels_last": True}, {"amp": "bf16"}, {"fused_optimizer": True},
    {"optimizer": "adamw"}, {"optimizer": "sgd", "lr": 0.05}, {"scheduler": "none"},
    {"plateau_loss": "epoch_mean"},
])
def test_speed_and_recipe_options_train_on_cpu(subset, option):
    _, history, _ = _fit(dataclasses.replace(SMALL, **option), subset)
    assert history[1]["train_loss"] < history[0]["train_loss"]


def test_compile_option_trains_on_cpu(subset):
    pytest.importorskip("torch._inductor")
    params = dataclasses.replace(SMALL, epochs=1, compile=True)
    _, history, _ = _fit(params, subset)
    assert history[0]["train_accuracy"] > 0.3


def test_plateau_scheduler_steps_once_per_epoch(subset):
    # patience 0 and a 99% threshold: every epoch after the first counts as no improvement
    params = dataclasses.replace(SMALL, epochs=3, plateau_patience=0, plateau_threshold=0.99)
    _, history, _ = _fit(params, subset)
    assert [h["lr"] for h in history] == pytest.approx([1e-3, 1e-4, 1e-5])


@pytest.mark.parametrize("choice, key", [("last_batch", "last_batch_loss"),
                                         ("epoch_mean", "train_loss")])
def test_plateau_scheduler_is_stepped_on_the_chosen_loss(subset, choice, key):
    params = dataclasses.replace(SMALL, epochs=1, plateau_loss=choice)
    state, history, _ = _fit(params, subset)
    assert state.scheduler.best == pytest.approx(history[0][key])
    assert history[0]["last_batch_loss"] != history[0]["train_loss"]


def test_select_device():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training(subset):
    state = build_state(SMALL, torch.device("cuda"))
    x, y = (t.cuda() for t in subset)
    history = fit(state, SMALL, x, y)
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_run_training_is_deterministic_on_cpu(raw_dir, tmp_path):
    """Two runs with the same params: identical metrics and byte-identical weights."""
    stats = {"mean": 0.1307, "std": 0.3081}
    results = []
    for name in ("a", "b"):
        out = TrainOutputs(*(tmp_path / name / f for f in ("w.pt", "m.json", "h.json", "r.json")))
        run_training(SMALL, raw_dir, stats, out, torch.device("cpu"), NullTracker(),
                     print_fn=lambda line: None)
        results.append(out)
    a, b = results
    assert a.weights.read_bytes() == b.weights.read_bytes()
    ma, mb = read_json(a.metrics), read_json(b.metrics)
    ma.pop("duration_seconds"), mb.pop("duration_seconds")
    assert ma == mb and ma["epochs"] == 2 and 0 < ma["test_accuracy"] <= 1
    assert [r["train_loss"] for r in read_json(a.history)] == [
        r["train_loss"] for r in read_json(b.history)]
    state = torch.load(a.weights, weights_only=True)
    assert "features.0.weight" in state and state["features.0.weight"].device.type == "cpu"
