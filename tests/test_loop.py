"""The training loop on real MNIST (a subset): options, metrics and CPU determinism."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mnist_pipeline import fused
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.io import read_json
from mnist_pipeline.loop import build_state, fit, to_tensor
from mnist_pipeline.params import TrainParams
from mnist_pipeline.runtime import select_device
from mnist_pipeline.tracking import NullTracker
from mnist_pipeline.train_stage import TrainOutputs, run_training

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
    {"channels_last": False}, {"amp": "bf16"}, {"fused_optimizer": False},
    {"channels_last": False, "fused_optimizer": False}, {"fused_kernels": False},
    {"optimizer": "adamw"}, {"optimizer": "sgd", "lr": 0.05}, {"scheduler": "none"},
    {"plateau_loss": "epoch_mean"}, {"scheduler": "onecycle", "lr": 0.003},
    {"scheduler": "cosine"}, {"augment": True}, {"ema_decay": 0.9}, {"label_smoothing": 0.1},
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
    for wrong in ("foo", "cuda:abc", "mps", "meta"):
        with pytest.raises(PipelineError, match="expected auto, cpu, cuda or cuda:N"):
            select_device(wrong)
    with pytest.raises(PipelineError, match="CUDA GPU"):
        select_device(f"cuda:{torch.cuda.device_count()}")  # one past the last (or no GPU)


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
    assert ma == mb and ma["epochs"] == 2 and 0 < ma["train_accuracy"] <= 1
    assert "test_accuracy" not in ma  # the evaluate stage alone scores the test set
    assert [r["train_loss"] for r in read_json(a.history)] == [
        r["train_loss"] for r in read_json(b.history)]
    state = torch.load(a.weights, weights_only=True)
    assert "features.0.weight" in state and state["features.0.weight"].device.type == "cpu"


def test_a_resume_with_another_thread_count_is_noted(raw_dir, tmp_path):
    """Threads change the rounding of PyTorch's CPU ops: the checkpoint records the runtime,
    and a resume with another one says so, in its output and in the run's tags."""
    stats = {"mean": 0.1307, "std": 0.3081}
    out = TrainOutputs(*(tmp_path / f for f in ("w.pt", "m.json", "h.json", "r.json")),
                       checkpoint=tmp_path / "ckpt.pt")
    steps = []

    def stop_in_epoch_two() -> None:
        steps.append(1)
        if len(steps) > 25:  # (20 steps an epoch)
            raise KeyboardInterrupt

    class Tags(NullTracker):
        seen: dict[str, str] = {}

        def set_tags(self, tags):
            self.seen.update(tags)

    threads = torch.get_num_threads()
    lines = []
    try:
        torch.set_num_threads(2)
        with pytest.raises(KeyboardInterrupt):
            run_training(SMALL, raw_dir, stats, out, torch.device("cpu"), NullTracker(),
                         print_fn=lambda line: None, on_step=stop_in_epoch_two)
        runtime = torch.load(out.checkpoint, weights_only=True)["runtime"]
        assert runtime["cpu_threads"] == "2"
        assert runtime["fused_kernels"] == fused.status(SMALL, torch.device("cpu"))
        torch.set_num_threads(1)
        run_training(SMALL, raw_dir, stats, out, torch.device("cpu"), Tags(),
                     print_fn=lines.append)
    finally:
        torch.set_num_threads(threads)
    assert "Note: resuming with cpu_threads 2 -> 1: the result can differ in rounding from " \
        "an uninterrupted run" in lines
    assert Tags.seen["resumed_with_runtime_change"] == "cpu_threads 2 -> 1"
    assert Tags.seen["cpu_threads"] == "1"
    assert torch.load(out.checkpoint, weights_only=True)["runtime"]["cpu_threads"] == "1"


def test_validation_split_is_disjoint_and_seeded():
    from mnist_pipeline.train_stage import split_validation

    keep, held = split_validation(100, 10, seed=3)
    assert len(held) == 10 and len(keep) == 90 and not set(keep) & set(held)
    assert (split_validation(100, 10, seed=3)[1] == held).all()
    assert not (split_validation(100, 10, seed=4)[1] == held).all()


def test_validation_metrics_and_best_epoch(subset):
    x, y = subset
    params = dataclasses.replace(SMALL, epochs=3, val_size=100, select_best=True,
                                 plateau_loss="val_loss")
    state = build_state(params, torch.device("cpu"))
    history = fit(state, params, x[100:], y[100:], val=(x[:100], y[:100]))
    assert all({"val_loss", "val_accuracy"} <= set(row) for row in history)
    best = max(history, key=lambda r: r["val_accuracy"])
    assert state.best["epoch"] == best["epoch"]
    from mnist_pipeline.loop import final_model, validate

    again = validate(final_model(state), x[:100], y[:100], 50)["accuracy"]
    assert again == pytest.approx(best["val_accuracy"])


def test_stops_early_rule():
    from mnist_pipeline.loop import stops_early

    rows = [{"val_loss": v} for v in (0.5, 0.4, 0.45, 0.41)]
    assert stops_early(rows, 2)  # the best (0.4) is two epochs back
    assert not stops_early(rows, 3)  # of the last three, 0.4 improved on 0.5
    assert not stops_early(rows[:3], 2)  # only one epoch since the best
    assert not stops_early(rows, 0) and not stops_early([], 1)
    assert stops_early([{"val_loss": 0.4}, {"val_loss": 0.4}], 1)  # equal is no improvement


def test_early_stopping_ends_training_and_resuming_trains_no_more(subset):
    from mnist_pipeline.loop import stops_early

    x, y = subset
    # trained on shuffled labels, the model soon gets worse on the true validation labels
    noise = y[100:][torch.randperm(len(y) - 100, generator=torch.Generator().manual_seed(0))]
    params = dataclasses.replace(SMALL, epochs=12, scheduler="none", val_size=100,
                                 early_stop_patience=2)
    state = build_state(params, torch.device("cpu"))
    history = fit(state, params, x[100:], noise, val=(x[:100], y[:100]))
    assert len(history) == state.epoch < params.epochs
    assert stops_early(history, 2)
    assert not any(stops_early(history[:n], 2) for n in range(1, len(history)))
    again = fit(state, params, x[100:], noise, val=(x[:100], y[:100]))
    assert len(again) == state.epoch == len(history)  # as a resumed run: stops at once
    off = dataclasses.replace(params, epochs=len(history) + 1, early_stop_patience=0)
    state = build_state(off, torch.device("cpu"))
    assert len(fit(state, off, x[100:], noise, val=(x[:100], y[:100]))) == off.epochs


def test_select_best_needs_a_validation_split():
    from mnist_pipeline.params import ParamsError

    with pytest.raises(ParamsError, match="train.select_best: needs a validation split"):
        TrainParams(select_best=True)
    with pytest.raises(ParamsError, match="train.early_stop_patience: needs a validation"):
        TrainParams(early_stop_patience=3)


def test_tta_evaluation_matches_the_served_model(subset):
    from mnist_pipeline.inference import predict_logits
    from mnist_pipeline.model import DeployableModel

    x, _ = subset
    state, _, _ = _fit(dataclasses.replace(SMALL, epochs=1), subset)
    net = state.model.eval()
    logits = predict_logits(net, x[:20], 10, tta=True)
    served = DeployableModel(net, 0.1307, 0.3081, tta=True).eval()(x[:20] * 0.3081 + 0.1307)
    torch.testing.assert_close(logits.exp(), served.detach(), atol=1e-5, rtol=1e-4)
    plain = DeployableModel(net, 0.1307, 0.3081).eval()(x[:20] * 0.3081 + 0.1307)
    assert not torch.allclose(plain, served)


def test_random_affine_is_seeded_and_identity_at_zero():
    from mnist_pipeline.augment import random_affine

    x = torch.randn(4, 1, 28, 28)
    same = random_affine(x, torch.Generator().manual_seed(0), 0, 0, 0)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    a = random_affine(x, torch.Generator().manual_seed(1))
    b = random_affine(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, x)


def test_checkpoint_round_trip_with_every_state(subset, tmp_path):
    """Stopping after epoch 1 and resuming gives exactly the uninterrupted result."""
    from mnist_pipeline.checkpoint import load_checkpoint, restore, save_checkpoint

    params = dataclasses.replace(SMALL, epochs=2, scheduler="onecycle", ema_decay=0.9,
                                 augment=True, val_size=100, select_best=True)
    x, y = subset
    val = (x[:100], y[:100])
    straight = build_state(params, torch.device("cpu"), len(x[100:]) // params.batch_size)
    fit(straight, params, x[100:], y[100:], val=val)

    first = build_state(params, torch.device("cpu"), len(x[100:]) // params.batch_size)
    fit(first, dataclasses.replace(params, epochs=1), x[100:], y[100:], val=val)
    save_checkpoint(tmp_path / "c.pt", first, "run", "fp")
    resumed = build_state(params, torch.device("cpu"), len(x[100:]) // params.batch_size)
    restore(resumed, load_checkpoint(tmp_path / "c.pt"))
    fit(resumed, params, x[100:], y[100:], val=val)
    for a, b in ((straight.eval_model(), resumed.eval_model()), (straight.model, resumed.model)):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(),
                                      strict=True):
            assert ka == kb and torch.equal(va, vb), ka
    assert straight.history[-1]["lr"] == resumed.history[-1]["lr"]


def test_weight_ema_follows_training_from_the_start(subset):
    from mnist_pipeline.loop import validate

    x, y = subset
    params = dataclasses.replace(SMALL, epochs=2, ema_decay=0.9)
    state = build_state(params, torch.device("cpu"), len(x) // params.batch_size)
    fit(state, params, x, y)
    assert state.ema.updates == 2 * (len(x) // params.batch_size)
    ema_acc = validate(state.eval_model(), x, y, 100)["accuracy"]
    # 24 updates only: the average lags the model (64% here) but is far from chance (10%),
    # which is where it stays for thousands of steps without the warm-up
    assert ema_acc > 0.3
    assert state.eval_model() is not state.model


def test_cpu_determinism_skips_the_nan_fill_and_changes_no_bit(subset):
    """configure_determinism turns off deterministic mode's NaN fill of new tensors (a
    debugging aid that cost 5-15% of a CPU step): the weights are identical without it."""
    import torch.utils.deterministic as tud

    from mnist_pipeline.runtime import configure_determinism

    saved = torch.are_deterministic_algorithms_enabled(), tud.fill_uninitialized_memory
    params = dataclasses.replace(SMALL, epochs=1)
    weights = []
    try:
        assert configure_determinism(torch.device("cpu"), True) == "deterministic"
        assert torch.are_deterministic_algorithms_enabled() and not tud.fill_uninitialized_memory
        for fill in (True, False):
            tud.fill_uninitialized_memory = fill
            weights.append(_fit(params, (subset[0][:200], subset[1][:200]))[0].model.state_dict())
    finally:
        torch.use_deterministic_algorithms(saved[0])
        tud.fill_uninitialized_memory = saved[1]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_tune_cpu_allocator_applies_on_glibc_only_and_is_idempotent():
    import os

    from mnist_pipeline.runtime import tune_cpu_allocator

    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, OSError, ValueError):
        glibc = False
    assert tune_cpu_allocator() is glibc and tune_cpu_allocator() is glibc


def test_fp32_speed_options_are_on_by_default_and_can_be_turned_off():
    cpu = torch.device("cpu")
    state = build_state(TrainParams(), cpu)
    conv = state.model.features[3].weight  # (32, 16, 3, 3): the two formats differ
    assert conv.is_contiguous(memory_format=torch.channels_last) and conv.dtype == torch.float32
    assert state.optimizer.defaults["fused"] is True
    plain = build_state(TrainParams(channels_last=False, fused_optimizer=False), cpu)
    assert plain.model.features[3].weight.is_contiguous()
    assert not plain.model.features[3].weight.is_contiguous(memory_format=torch.channels_last)
    assert not plain.optimizer.defaults["fused"]


@pytest.mark.parametrize("subset, val_size", [(50, 0), (1000, 950)])
def test_fewer_training_images_than_one_batch_stop_before_training(tmp_path, subset, val_size):
    """A subset or validation split that leaves less than one batch would register an
    untrained model (no step is taken): refused, naming the key."""
    import dataclasses

    import numpy as np

    from mnist_pipeline.data import SPLITS
    from mnist_pipeline.train_stage import prepare_data

    from .conftest import write_idx

    rng = np.random.default_rng(0)
    images, labels = SPLITS["train"]
    write_idx(tmp_path / images, rng.integers(0, 256, (1000, 28, 28), dtype=np.uint8))
    write_idx(tmp_path / labels, rng.integers(0, 10, 1000, dtype=np.uint8))
    params = dataclasses.replace(TrainParams(), train_subset=subset, val_size=val_size)
    with pytest.raises(PipelineError, match="train.batch_size: 100 is more than the 50 "):
        prepare_data(params, tmp_path, {"mean": 0.1, "std": 0.3}, torch.device("cpu"))
