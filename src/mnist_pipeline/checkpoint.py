"""Per-epoch training checkpoints: everything needed to resume exactly where a run stopped.

A checkpoint holds the model, optimizer, scheduler and shuffling-generator states (with
several ranks, each rank's augmentation generator too), the epoch and history, the MLflow run
id, a fingerprint of the params, data and world size it belongs to, and the runtime that
rounds the arithmetic (CPU, threads, fused kernels: a resume with another one is noted). It is
written atomically (a kill at any moment leaves the previous one intact) and read with
`weights_only=True` (no pickle).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from .errors import PipelineError
from .io import write_bytes
from .loop import TrainState


class CheckpointError(PipelineError):
    """A checkpoint or weights file that cannot be read."""


def save_checkpoint(path: Path, state: TrainState, run_id: str | None, fingerprint: str,
                    complete: bool = False,
                    rank_generators: list[torch.Tensor] | None = None,
                    runtime: dict[str, str] | None = None) -> None:
    """Write `state` (and every rank's augmentation generator state, when there are several
    ranks, and the `runtime` it was trained with) to `path`."""
    payload = {
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict() if state.scheduler is not None else None,
        "generator": state.generator.get_state(),
        "epoch": state.epoch,
        "history": state.history,
        "run_id": run_id,
        "fingerprint": fingerprint,
        "complete": complete,
        "batch_scheduler": (state.batch_scheduler.state_dict()
                            if state.batch_scheduler is not None else None),
        "ema": state.ema.state_dict() if state.ema is not None else None,
        "best": state.best,
        "rank_generators": rank_generators,
        "runtime": runtime,
    }
    save_state_file(path, payload)


def save_state_file(path: Path, obj: Any) -> None:
    """torch.save, atomically, with a fixed archive name inside the file (so that the same
    state gives the same bytes whatever the path): the twin of load_state_file."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())


def load_state_file(path: Path) -> Any:
    """torch.load with weights_only=True, turning any failure into a CheckpointError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except Exception as exc:  # truncated zip, garbage, pickled code: all the same to a user
        raise CheckpointError(
            f"{path}: not a readable PyTorch state file ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); delete it and re-run"
        ) from None


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at `path`, or None if there is none."""
    if not path.exists():
        return None
    payload = load_state_file(path)
    needed = {"model", "optimizer", "scheduler", "generator", "epoch", "history", "run_id",
              "fingerprint", "complete"}
    if not isinstance(payload, dict) or not needed <= set(payload):
        raise CheckpointError(f"{path}: not a training checkpoint of this pipeline")
    return payload


def restore(state: TrainState, payload: dict[str, Any], rank: int = 0) -> None:
    """Put the checkpoint's states into a freshly built TrainState (of rank `rank`)."""
    try:
        if state.augment_generator is not None:
            state.augment_generator.set_state(payload["rank_generators"][rank])
        state.model.load_state_dict(payload["model"])
        state.optimizer.load_state_dict(payload["optimizer"])
        if state.scheduler is not None:
            state.scheduler.load_state_dict(payload["scheduler"])
        state.generator.set_state(payload["generator"])
        if state.batch_scheduler is not None:
            state.batch_scheduler.load_state_dict(payload["batch_scheduler"])
        if state.ema is not None:
            state.ema.load_state_dict(payload["ema"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
        raise CheckpointError(f"checkpoint does not fit the model: {exc}") from None
    state.best = payload.get("best")
    state.epoch = int(payload["epoch"])
    state.history = list(payload["history"])
