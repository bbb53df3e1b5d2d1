"""What the train stage runs: data and params in; a tracked run, a registered model and the
stage's output files out. Four named steps: `prepare_data`, `resume_point`, `train` and
`publish`; `run_training` calls them in order. The test set is not touched here: the evaluate
stage scores the registered model. With several ranks (torchrun), every rank trains and rank 0
alone reads the checkpoint, logs, registers and writes the outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import load_checkpoint, restore, save_checkpoint, save_state_file
from .data import SPLITS, load_split
from .distributed import SINGLE, World, plain_batchnorm
from .errors import PipelineError
from .fused import status as fused_status
from .fused_build import build_name as kernels_build
from .io import save_png, write_json
from .loop import TrainState, build_state, final_model, fit, to_tensor
from .metrics import figure_image, training_curves_figure
from .model import MnistCNN
from .params import TrainParams, to_dict
from .registry import deployable, log_and_register
from .runtime import configure_determinism, environment_tags
from .tracking import NullTracker, TrackingError, file_md5s, params_hash, store_name

Tensors = tuple[torch.Tensor, torch.Tensor]
EPOCH_METRICS = ("train_loss", "train_accuracy", "lr", "epoch_seconds", "val_loss",
                 "val_accuracy")
# The run's tags that decide the rounding of its arithmetic, beyond params and data: kept in
# the checkpoint, so that a resume with other values says so (README.md, runtime choices).
RUNTIME_TAGS = ("device_name", "cpu_threads", "fused_kernels", "fused_kernels_build")


@dataclass(frozen=True)
class TrainOutputs:
    """Where the train stage writes (wired in dvc.yaml)."""

    weights: Path
    metrics: Path
    history: Path
    run_info: Path
    checkpoint: Path | None = None  # resumable state after each epoch (None: no resume)
    curves: Path | None = None  # PNG of loss, accuracy and learning rate per epoch


@dataclass(frozen=True)
class TrainData:
    """The training (and validation) tensors on the device, and what they were made from."""

    train: Tensors
    val: Tensors | None
    mean: float
    std: float
    md5s: dict[str, str]  # of the four IDX files
    example: np.ndarray  # two training images as raw pixels: the logged model's input example
    images: np.ndarray  # the training images (uint8) and labels as read: the run's dataset
    labels: np.ndarray
    source: str  # where they were read from

    def fingerprint(self, params: TrainParams, world_size: int = 1) -> str:
        """What a checkpoint must match to be resumed: params, normalisation, data and the
        number of training processes."""
        return params_hash({**to_dict(params), "stats": [self.mean, self.std],
                            "data": self.md5s, "world_size": world_size})


def split_validation(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): `size` images carved out of n by `seed`."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[size:]), np.sort(order[:size])


def prepare_data(params: TrainParams, raw_dir: Path, stats: Mapping[str, Any],
                 device: torch.device) -> TrainData:
    """The training images (a subset, minus a validation split, as params say), normalised
    with the training statistics, on `device`."""
    mean, std = float(stats["mean"]), float(stats["std"])
    images, labels = load_split(raw_dir, "train")
    if params.train_subset:
        images, labels = images[: params.train_subset], labels[: params.train_subset]
    parts = {"train": (images, labels)}
    if params.val_size:
        if params.val_size >= len(images):
            raise PipelineError(f"params: train.val_size: {params.val_size} leaves no "
                                f"training images out of {len(images)}")
        keep, held = split_validation(len(images), params.val_size, params.seed)
        parts["train"], parts["val"] = (images[keep], labels[keep]), (images[held], labels[held])
    if len(parts["train"][0]) < params.batch_size:  # not one step: the model would not train
        raise PipelineError(f"params: train.batch_size: {params.batch_size} is more than the "
                            f"{len(parts['train'][0])} training images left (train_subset, "
                            "val_size): not one full batch to train on")
    tensors = {name: (to_tensor(im, mean, std, device, params.channels_last),
                      torch.from_numpy(lab).to(device)) for name, (im, lab) in parts.items()}
    md5s = file_md5s([raw_dir / name for split in SPLITS.values() for name in split])
    example = (images[:2, None] / 255.0).astype(np.float32)
    return TrainData(tensors["train"], tensors.get("val"), mean, std, md5s, example,
                     *parts["train"], str(raw_dir.resolve()))


def runtime_changes(before: Mapping[str, str] | None, now: Mapping[str, str]) -> str:
    """How the runtime of a resumed run differs from its checkpoint's ('' if it does not, or
    if the checkpoint does not say), e.g. "cpu_threads 2 -> 1"."""
    return ", ".join(f"{k} {before[k]} -> {now[k]}" for k in RUNTIME_TAGS
                     if before and k in before and k in now and before[k] != now[k])


def resume_point(path: Path | None, fingerprint: str, print_fn: Callable[[str], None]
                 ) -> dict[str, Any] | None:
    """The checkpoint to resume from, or None (none there, finished, or from other inputs)."""
    payload = load_checkpoint(path) if path is not None else None
    if payload is None or payload["complete"]:
        return None
    if payload["fingerprint"] != fingerprint:
        print_fn(f"Discarding checkpoint {path}: it was made with other params or data")
        return None
    return payload


# In MLflow the per-epoch curves form the section "epoch" (a key prefix): a run's page shows
# that section first, before the single values (test scores), each chart titled train_loss, lr...
CURVES = "epoch/"


def epoch_metrics(row: Mapping[str, float]) -> dict[str, float]:
    """The per-epoch values that are logged and plotted (not last_batch_loss)."""
    return {k: row[k] for k in EPOCH_METRICS if k in row}


def curves(row: Mapping[str, float]) -> dict[str, float]:
    """`epoch_metrics` as MLflow keys: epoch/train_loss, epoch/lr, ..."""
    return {CURVES + k: v for k, v in epoch_metrics(row).items()}


def epoch_line(epoch: int, metrics: Mapping[str, float]) -> str:
    val = (f", Val: {metrics['val_accuracy']:.4f}" if "val_accuracy" in metrics else "")
    return (f"Epoch: {epoch}, Loss: {metrics['train_loss']:.6f}, LR: {metrics['lr']:.3g}, "
            f"Accuracy: {metrics['train_accuracy']:.4f}{val}, "
            f"Time: {metrics['epoch_seconds']:.1f} s")


def run_tags(params: TrainParams, data: TrainData, device: torch.device, determinism: str,
             extra: Mapping[str, str] | None, world: World = SINGLE,
             model: torch.nn.Module | None = None) -> dict[str, str]:
    """Provenance of the run: environment, data checksums, params hash, the kernels that
    train `model` (see fused.status) and their build, the number of processes (threads are
    per process)."""
    kernels = fused_status(params, device, model)
    return {
        **environment_tags(device, determinism),
        "world_size": str(world.size),
        "distributed_backend": world.backend or "none",
        **{f"data_md5.{k}": v for k, v in data.md5s.items()},
        "params_hash": params_hash(to_dict(params)),
        "fused_kernels": kernels,
        "fused_kernels_build": kernels_build() if kernels == "on" else "none",
        **(extra or {}),
    }


def describe_run(params: TrainParams, data: TrainData, tags: Mapping[str, str]) -> str:
    """The run's description in the MLflow UI (markdown): the recipe's key params, the data
    and the code it was trained from."""
    schedule = {"plateau": "ReduceLROnPlateau", "onecycle": "OneCycle", "cosine": "cosine",
                "none": "constant"}[params.scheduler]
    extras = [name for name, on in (("augmentation", params.augment),
                                    (f"EMA {params.ema_decay}", params.ema_decay > 0),
                                    (f"label smoothing {params.label_smoothing}",
                                     params.label_smoothing > 0),
                                    ("test-time shifts", params.tta)) if on]
    commit = tags.get("git_commit", "unknown")[:12] + (
        " (uncommitted changes)" if tags.get("git_dirty") == "true" else "")
    return "\n".join([
        f"**{params.epochs} epoch{'s' if params.epochs != 1 else ''}** of {params.optimizer} "
        f"(lr {params.lr:g}, {schedule}), "
        f"batch {params.batch_size}, seed {params.seed}, {params.nproc} process(es)",
        f"- beyond the reference: {', '.join(extras) or 'nothing (the reference recipe)'}",
        f"- data: {len(data.images) + params.val_size} training images ({params.val_size} "
        "held out), IDX MD5 "
        + ", ".join(f"{k.split('-')[0]} {k.split('-')[1]} {v[:8]}"
                    for k, v in sorted(data.md5s.items())),
        f"- code: git {commit}",
    ])


def train(
    state: TrainState, params: TrainParams, data: TrainData, tracker: NullTracker,
    outputs: TrainOutputs, fingerprint: str, print_fn: Callable[[str], None],
    on_step: Callable[[], None] | None = None, world: World = SINGLE,
    runtime: dict[str, str] | None = None,
) -> list[dict[str, float]]:
    """Run the epochs left, checkpointing (with the `runtime` record) and logging after each;
    return the whole history. Every rank calls it; only rank 0's tracker and print_fn do
    anything."""
    logged = tracker.logged_steps(CURVES + "train_loss")
    for row in state.history:  # epochs finished before a kill but never logged
        if row["epoch"] not in logged:
            tracker.log_metrics(curves(row), step=row["epoch"])

    def checkpoint() -> None:
        generators = None
        if state.augment_generator is not None:  # (a collective: every rank takes part)
            generators = world.gather(state.augment_generator.get_state())
        if outputs.checkpoint is not None and world.is_main:
            save_checkpoint(outputs.checkpoint, state, tracker.run_id, fingerprint,
                            rank_generators=generators, runtime=runtime)

    def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
        checkpoint()  # first: a kill after this line loses nothing
        print_fn(epoch_line(epoch, metrics))
        tracker.log_metrics(curves(metrics), step=epoch)

    checkpoint()  # records the run id before the first epoch
    history = fit(state, params, *data.train, on_epoch_end, on_step, data.val, world)
    if state.epoch < params.epochs:
        tracker.log_metrics({"stopped_epoch": state.epoch})
        print_fn(f"Stopped early after epoch {state.epoch}: no lower validation loss in "
                 f"{params.early_stop_patience} epoch(s)")
    if state.best is not None:
        tracker.log_metrics({"best_epoch": state.best["epoch"]})
        print_fn(f"Best epoch on validation: {state.best['epoch']} "
                 f"({state.best['val_accuracy']:.4%})")
    return history


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """A plain state_dict on the CPU (contiguous), written atomically."""
    save_state_file(path, {k: v.detach().cpu().contiguous()
                           for k, v in model.state_dict().items()})


def register(net: torch.nn.Module, params: TrainParams, data: TrainData,
             tracker: NullTracker, weights: Path) -> dict[str, Any]:
    """Log the weights and the deployable model to the run and register a new version."""
    try:
        tracker.log_artifact(weights, "weights")  # for ensembles
        registered = log_and_register(deployable(net, data.mean, data.std, params.tta),
                                      data.example, params.registered_model, tracker.run_id)
    except Exception as exc:  # the store went away: keep everything for a re-run
        raise TrackingError(
            f"could not log and register the model ({type(exc).__name__}: "
            f"{str(exc)[:300]}). Weights and checkpoint are kept: re-run when the "
            "tracking store is back to log and register without training again."
        ) from None
    return {"model_uri": registered.model_uri, "registered_model": registered.registered_model,
            "version": registered.version, "registry_uri": registered.registry_uri,
            "tracking_uri": store_name(getattr(tracker, "uri", ""))}


def publish(
    state: TrainState, params: TrainParams, data: TrainData, tracker: NullTracker,
    outputs: TrainOutputs, history: list[dict[str, float]], duration: float,
    print_fn: Callable[[str], None],
) -> dict[str, Any]:
    """Write the weights, history and metrics; log and register the model (when tracked).
    An earlier run's metrics and run record go first: if registering fails, no record of
    another version stands beside these weights (`dvc repro` deletes them anyway)."""
    for stale in (outputs.metrics, outputs.run_info):
        stale.unlink(missing_ok=True)
    net = plain_batchnorm(final_model(state), MnistCNN)
    save_weights(net, outputs.weights)
    last = history[-1]
    metrics = {
        **{k: last[k] for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
           if k in last},
        "epochs": state.epoch, "duration_seconds": round(duration, 3),
    }
    write_json(outputs.history, [{"epoch": row["epoch"], **epoch_metrics(row)}
                                 for row in history])
    if outputs.curves is not None:
        save_png(figure_image(training_curves_figure(history)), outputs.curves)
    run_info: dict[str, Any] = {"run_id": tracker.run_id}
    if tracker.run_id is not None:
        run_info.update(register(net, params, data, tracker, outputs.weights))
        print_fn(f"Registered {run_info['registry_uri']} (run {tracker.run_id})")
    write_json(outputs.metrics, metrics)
    write_json(outputs.run_info, run_info)
    return {**metrics, **run_info}


def run_training(
    params: TrainParams, raw_dir: Path, stats: Mapping[str, Any], outputs: TrainOutputs,
    device: torch.device, tracker: NullTracker | None = None,
    tags: Mapping[str, str] | None = None, print_fn: Callable[[str], None] = print,
    on_step: Callable[[], None] | None = None, world: World = SINGLE,
    run_name: str | None = None,
) -> dict[str, Any]:
    """Train (resuming from the checkpoint when there is a matching one), save weights and
    metrics, log and register the model in a run named `run_name` (a resumed run keeps its
    name). With several ranks every rank calls it; rank 0 returns the result, the others an
    empty dict."""
    if not world.is_main:
        tracker, print_fn = NullTracker(), _quiet
    tracker = tracker or NullTracker()
    data = prepare_data(params, raw_dir, stats, device)
    fingerprint = data.fingerprint(params, world.size)
    determinism = configure_determinism(device, params.cuda_deterministic)
    state = build_state(params, device, len(data.train[0]) // params.batch_size, world)
    all_tags = run_tags(params, data, device, determinism, tags, world, state.model)
    runtime = {k: all_tags[k] for k in RUNTIME_TAGS}
    resume = world.broadcast(resume_point(outputs.checkpoint, fingerprint, print_fn)
                             if world.is_main else None)
    if resume is not None:
        restore(state, resume, world.rank)
        print_fn(f"Resuming after epoch {state.epoch} (MLflow run {resume['run_id']})")
        changed = runtime_changes(resume.get("runtime"), runtime)
        if changed:
            all_tags["resumed_with_runtime_change"] = changed
            print_fn(f"Note: resuming with {changed}: the result can differ in rounding "
                     "from an uninterrupted run")
    started = time.perf_counter()
    result: dict[str, Any] = {}
    with tracker.run(run_name=None if resume else run_name,
                     run_id=resume["run_id"] if resume else None):
        tracker.set_tags({**all_tags,
                          "mlflow.note.content": describe_run(params, data, all_tags)})
        if resume is None:
            tracker.log_params({**to_dict(params), "stats.mean": data.mean,
                                "stats.std": data.std})
            tracker.log_dataset(data.images, data.labels, "mnist-train", data.source,
                                digest=params_hash({"data": data.md5s, **{
                                    k: getattr(params, k)
                                    for k in ("train_subset", "val_size", "seed")}})[:8])
        history = train(state, params, data, tracker, outputs, fingerprint, print_fn, on_step,
                        world, runtime)
        if world.is_main:
            result = publish(state, params, data, tracker, outputs, history,
                             time.perf_counter() - started, print_fn)
            if outputs.checkpoint is not None:
                save_checkpoint(outputs.checkpoint, state, tracker.run_id, fingerprint,
                                complete=True, runtime=runtime)
    return result


def _quiet(line: str) -> None:
    """print_fn of the ranks other than 0."""
