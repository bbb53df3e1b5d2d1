"""The train stage's workflow: data and params in; a tracked run, a registered model and the
stage's output files out. Kept apart from `train.py` so that the training loop stays pure.
"""

from __future__ import annotations

import io
import platform
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_checkpoint, restore, save_checkpoint
from .data import SPLITS, load_split
from .io import write_bytes, write_json
from .params import TrainParams, to_dict
from .registry import deployable, log_and_register
from .tracking import NullTracker, TrackingError, file_md5s, params_hash
from .train import (
    TrainState,
    build_state,
    configure_determinism,
    evaluate,
    fit,
    to_tensor,
)


@dataclass(frozen=True)
class TrainOutputs:
    """Where the train stage writes (wired in dvc.yaml)."""

    weights: Path
    metrics: Path
    history: Path
    run_info: Path
    checkpoint: Path | None = None  # resumable state after each epoch (None: no resume)


def environment_tags(device: torch.device, determinism: str, threads: int) -> dict[str, str]:
    """The device and library versions, recorded with every run."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {
        "device": device.type,
        "device_name": name or platform.machine(),
        "torch_version": torch.__version__,
        "cuda_version": str(torch.version.cuda) if device.type == "cuda" else "none",
        "determinism": determinism,
        "cpu_threads": str(threads),
        "python_version": sys.version.split()[0],
    }


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """A plain state_dict on the CPU (contiguous), written atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()  # a fixed archive name inside the file, whatever the path
    torch.save(state, buffer)
    write_bytes(path, buffer.getvalue())


def epoch_line(epoch: int, metrics: Mapping[str, float]) -> str:
    return (f"Epoch: {epoch}, Loss: {metrics['train_loss']:.6f}, LR: {metrics['lr']:.3g}, "
            f"Accuracy: {metrics['train_accuracy']:.4f}, Time: {metrics['epoch_seconds']:.1f} s")


def _tensors(params: TrainParams, raw_dir: Path, mean: float, std: float,
             device: torch.device) -> tuple[torch.Tensor, ...]:
    """(x, y, x_test, y_test) on `device`, normalised with the training statistics."""
    train_images, train_labels = load_split(raw_dir, "train")
    test_images, test_labels = load_split(raw_dir, "test")
    if params.train_subset:
        train_images = train_images[: params.train_subset]
        train_labels = train_labels[: params.train_subset]
    return (to_tensor(train_images, mean, std, device, params.channels_last),
            torch.from_numpy(train_labels).to(device),
            to_tensor(test_images, mean, std, device, params.channels_last),
            torch.from_numpy(test_labels).to(device))


def _resume_point(path: Path | None, fingerprint: str, print_fn: Callable[[str], None]
                  ) -> dict[str, Any] | None:
    """The checkpoint to resume from, or None (none there, finished, or from other inputs)."""
    payload = load_checkpoint(path) if path is not None else None
    if payload is None or payload["complete"]:
        return None
    if payload["fingerprint"] != fingerprint:
        print_fn(f"Discarding checkpoint {path}: it was made with other params or data")
        return None
    return payload


EPOCH_METRICS = ("train_loss", "train_accuracy", "lr", "epoch_seconds")


def run_training(
    params: TrainParams, raw_dir: Path, stats: Mapping[str, Any], outputs: TrainOutputs,
    device: torch.device, tracker: NullTracker | None = None,
    tags: Mapping[str, str] | None = None, print_fn: Callable[[str], None] = print,
    on_step: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train (resuming from the checkpoint when there is a matching one), evaluate on the test
    set, save weights and metrics, log and register the model."""
    tracker = tracker or NullTracker()
    mean, std = float(stats["mean"]), float(stats["std"])
    x, y, x_test, y_test = _tensors(params, raw_dir, mean, std, device)
    md5s = file_md5s([raw_dir / name for split in SPLITS.values() for name in split])
    fingerprint = params_hash({**to_dict(params), "stats": [mean, std], "data": md5s})
    determinism = configure_determinism(device, params.cuda_deterministic)
    all_tags = {
        **environment_tags(device, determinism, torch.get_num_threads()),
        **{f"data_md5.{k}": v for k, v in md5s.items()},
        "params_hash": params_hash(to_dict(params)),
        **(tags or {}),
    }
    state: TrainState = build_state(params, device)
    resume = _resume_point(outputs.checkpoint, fingerprint, print_fn)
    if resume is not None:
        restore(state, resume)
        print_fn(f"Resuming after epoch {state.epoch} (MLflow run {resume['run_id']})")
    started = time.perf_counter()
    with tracker.run(run_id=resume["run_id"] if resume else None):
        tracker.set_tags(all_tags)
        if resume is None:
            tracker.log_params({**to_dict(params), "stats.mean": mean, "stats.std": std})
        logged = tracker.logged_steps("train_loss")
        for row in state.history:  # epochs finished before a kill but never logged
            if row["epoch"] not in logged:
                tracker.log_metrics({k: row[k] for k in EPOCH_METRICS}, step=row["epoch"])

        def checkpoint(complete: bool = False) -> None:
            if outputs.checkpoint is not None:
                save_checkpoint(outputs.checkpoint, state, tracker.run_id, fingerprint, complete)

        def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
            checkpoint()  # first: a kill after this line loses nothing
            print_fn(epoch_line(epoch, metrics))
            tracker.log_metrics({k: metrics[k] for k in EPOCH_METRICS}, step=epoch)

        checkpoint()  # records the run id before the first epoch
        history = fit(state, params, x, y, on_epoch_end, on_step)
        duration = time.perf_counter() - started
        test = evaluate(state.model, x_test, y_test, params.eval_batch_size, params.amp)
        tracker.log_metrics({"test_accuracy": test["accuracy"], "test_loss": test["loss"]})
        print_fn(f"Test accuracy: {test['accuracy']:.4%}, test loss: {test['loss']:.4f}")

        save_weights(state.model, outputs.weights)
        metrics = {
            "train_loss": history[-1]["train_loss"], "test_accuracy": test["accuracy"],
            "test_loss": test["loss"], "epochs": params.epochs,
            "duration_seconds": round(duration, 3), "device": device.type,
        }
        write_json(outputs.history, [{"epoch": row["epoch"], **{k: row[k] for k in EPOCH_METRICS}}
                                     for row in history])
        run_info: dict[str, Any] = {"run_id": tracker.run_id}
        if tracker.run_id is not None:
            pixels = (x_test[:2].float().cpu() * std + mean).clamp(0, 1).contiguous().numpy()
            try:
                registered = log_and_register(
                    deployable(state.model, mean, std), pixels, params.registered_model,
                    tracker.run_id,
                )
            except Exception as exc:  # the store went away: keep everything for a re-run
                raise TrackingError(
                    f"could not log and register the model ({type(exc).__name__}: "
                    f"{str(exc)[:300]}). Weights and checkpoint are kept: re-run when the "
                    "tracking store is back to log and register without training again."
                ) from None
            run_info.update(
                model_uri=registered.model_uri, registered_model=registered.registered_model,
                version=registered.version, registry_uri=registered.registry_uri,
            )
            print_fn(f"Registered {registered.registry_uri} (run {tracker.run_id})")
        write_json(outputs.metrics, metrics)
        write_json(outputs.run_info, run_info)
        checkpoint(complete=True)
    return {**metrics, **run_info}
