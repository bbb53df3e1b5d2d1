"""The train stage's workflow: data and params in; a tracked run, a registered model and the
stage's output files out. Kept apart from `train.py` so that the training loop stays pure.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import load_checkpoint, restore, save_checkpoint, save_state_file
from .data import SPLITS, load_split
from .errors import PipelineError
from .io import write_json
from .params import TrainParams, to_dict
from .registry import deployable, log_and_register
from .tracking import NullTracker, TrackingError, file_md5s, params_hash
from .train import (
    TrainState,
    build_state,
    configure_determinism,
    evaluate,
    final_model,
    fit,
    fused_kernels_status,
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
    save_state_file(path, {k: v.detach().cpu().contiguous()
                           for k, v in model.state_dict().items()})


def epoch_line(epoch: int, metrics: Mapping[str, float]) -> str:
    val = (f", Val: {metrics['val_accuracy']:.4f}" if "val_accuracy" in metrics else "")
    return (f"Epoch: {epoch}, Loss: {metrics['train_loss']:.6f}, LR: {metrics['lr']:.3g}, "
            f"Accuracy: {metrics['train_accuracy']:.4f}{val}, "
            f"Time: {metrics['epoch_seconds']:.1f} s")


def split_validation(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): `size` images carved out of n by `seed`."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[size:]), np.sort(order[:size])


def _tensors(params: TrainParams, raw_dir: Path, mean: float, std: float,
             device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"train", "test"[, "val"]}: (x, y) on `device`, normalised with the training stats."""
    images, labels = load_split(raw_dir, "train")
    if params.train_subset:
        images, labels = images[: params.train_subset], labels[: params.train_subset]
    parts = {"train": (images, labels), "test": load_split(raw_dir, "test")}
    if params.val_size:
        if params.val_size >= len(images):
            raise PipelineError(f"params: train.val_size: {params.val_size} leaves no "
                                f"training images out of {len(images)}")
        keep, held = split_validation(len(images), params.val_size, params.seed)
        parts["train"], parts["val"] = (images[keep], labels[keep]), (images[held], labels[held])
    return {name: (to_tensor(im, mean, std, device, params.channels_last),
                   torch.from_numpy(lab).to(device)) for name, (im, lab) in parts.items()}


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


EPOCH_METRICS = ("train_loss", "train_accuracy", "lr", "epoch_seconds", "val_loss",
                 "val_accuracy")


def _epoch_metrics(row: Mapping[str, float]) -> dict[str, float]:
    return {k: row[k] for k in EPOCH_METRICS if k in row}


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
    data = _tensors(params, raw_dir, mean, std, device)
    (x, y), (x_test, y_test) = data["train"], data["test"]
    md5s = file_md5s([raw_dir / name for split in SPLITS.values() for name in split])
    fingerprint = params_hash({**to_dict(params), "stats": [mean, std], "data": md5s})
    determinism = configure_determinism(device, params.cuda_deterministic)
    all_tags = {
        **environment_tags(device, determinism, torch.get_num_threads()),
        **{f"data_md5.{k}": v for k, v in md5s.items()},
        "params_hash": params_hash(to_dict(params)),
        "fused_kernels": fused_kernels_status(params, device),
        **(tags or {}),
    }
    state: TrainState = build_state(params, device, len(x) // params.batch_size)
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
                tracker.log_metrics(_epoch_metrics(row), step=row["epoch"])

        def checkpoint(complete: bool = False) -> None:
            if outputs.checkpoint is not None:
                save_checkpoint(outputs.checkpoint, state, tracker.run_id, fingerprint, complete)

        def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
            checkpoint()  # first: a kill after this line loses nothing
            print_fn(epoch_line(epoch, metrics))
            tracker.log_metrics(_epoch_metrics(metrics), step=epoch)

        checkpoint()  # records the run id before the first epoch
        history = fit(state, params, x, y, on_epoch_end, on_step, data.get("val"))
        duration = time.perf_counter() - started
        net = final_model(state)
        if state.epoch < params.epochs:
            tracker.log_metrics({"stopped_epoch": state.epoch})
            print_fn(f"Stopped early after epoch {state.epoch}: no lower validation loss in "
                     f"{params.early_stop_patience} epoch(s)")
        if state.best is not None:
            tracker.log_metrics({"best_epoch": state.best["epoch"]})
            print_fn(f"Best epoch on validation: {state.best['epoch']} "
                     f"({state.best['val_accuracy']:.4%})")
        test = evaluate(net, x_test, y_test, params.eval_batch_size, params.amp, params.tta)
        tracker.log_metrics({"test_accuracy": test["accuracy"], "test_loss": test["loss"]})
        print_fn(f"Test accuracy: {test['accuracy']:.4%}, test loss: {test['loss']:.4f}")

        save_weights(net, outputs.weights)
        metrics = {
            "train_loss": history[-1]["train_loss"], "test_accuracy": test["accuracy"],
            "test_loss": test["loss"], "epochs": state.epoch,
            "duration_seconds": round(duration, 3), "device": device.type,
        }
        write_json(outputs.history, [{"epoch": row["epoch"], **_epoch_metrics(row)}
                                     for row in history])
        run_info: dict[str, Any] = {"run_id": tracker.run_id}
        if tracker.run_id is not None:
            pixels = (x_test[:2].float().cpu() * std + mean).clamp(0, 1).contiguous().numpy()
            try:
                tracker.log_artifact(outputs.weights, "weights")  # for ensembles
                registered = log_and_register(
                    deployable(net, mean, std, params.tta), pixels, params.registered_model,
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
