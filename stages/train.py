"""Stage `train`: train the CNN, track the run in MLflow and register the model.

Runtime choices (not DVC params): --device / $MNIST_DEVICE (auto, cpu, cuda, cuda:N),
--threads / $MNIST_THREADS (CPU threads per process), $MLFLOW_TRACKING_URI (default: SQLite
in the repository's mlruns/); with train.nproc > 1 the stage runs itself under torchrun
(--standalone, or $MNIST_TORCHRUN_ARGS, e.g. for several machines), --backend /
$MNIST_DIST_BACKEND (auto, gloo, nccl).
    python stages/train.py --params params.yaml --raw data/raw --stats data/stats.json \
        --weights models/model.pt --metrics metrics/train.json \
        --history plots/train_history.json --curves plots/train_curves.png \
        --run-info models/run.json --checkpoint checkpoints/train.pt
A run killed at any moment resumes from its last finished epoch when re-run (same MLflow run).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

from mnist_pipeline import openmp

os.environ.update(openmp.wait_policy(os.environ))  # before torch loads OpenMP (see openmp.py)

import torch  # noqa: E402

from mnist_pipeline import distributed  # noqa: E402
from mnist_pipeline.errors import run_stage  # noqa: E402
from mnist_pipeline.io import check_targets  # noqa: E402
from mnist_pipeline.params import load_params  # noqa: E402
from mnist_pipeline.runtime import select_device  # noqa: E402
from mnist_pipeline.stats import read_stats  # noqa: E402
from mnist_pipeline.tracking import MlflowTracker, git_state, resolve_tracking  # noqa: E402
from mnist_pipeline.train_stage import TrainOutputs, run_training  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("params", "raw", "stats", "weights", "metrics", "history", "run-info"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, help="resumable state, written every epoch")
    parser.add_argument("--curves", type=Path, help="PNG of the per-epoch curves")
    parser.add_argument("--device", default=os.environ.get("MNIST_DEVICE", "auto"))
    parser.add_argument("--threads", type=int, default=os.environ.get("MNIST_THREADS", "0"))
    parser.add_argument("--backend", default=os.environ.get("MNIST_DIST_BACKEND", "auto"))
    args = parser.parse_args(argv)

    params = load_params(args.params, "train")
    stats = read_stats(args.stats)
    outputs = TrainOutputs(args.weights, args.metrics, args.history, args.run_info,
                           args.checkpoint, args.curves)
    check_targets(*dataclasses.astuple(outputs))
    # When a tracking server goes away mid-run, give up on a request in seconds, not minutes:
    # metrics are kept and re-sent (see mnist_pipeline.tracking).
    for name, value in (("MAX_RETRIES", "2"), ("BACKOFF_FACTOR", "1"), ("TIMEOUT", "20")):
        os.environ.setdefault(f"MLFLOW_HTTP_REQUEST_{name}", value)
    device = select_device(args.device)
    uri, artifacts = resolve_tracking(os.environ, Path.cwd())
    tracker = MlflowTracker(uri, params.experiment_name, artifacts)
    world, note, launch = distributed.world_from_env(os.environ), None, None
    if distributed.launched_by_torchrun(os.environ):
        world, device, note = distributed.join(os.environ, device, args.backend,
                                               params.batch_size, params.compile, args.threads)
    elif params.nproc > 1 or os.environ.get("MNIST_TORCHRUN_ARGS"):
        launch = distributed.plan_torchrun(
            params.nproc, device, args.backend, params.batch_size, params.compile,
            args.threads, os.environ, [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    elif args.threads > 0:
        torch.set_num_threads(args.threads)
    if world.is_main:
        tracker.check()  # an unreachable store fails now, not after training
    if launch is not None:  # this process becomes torchrun, which runs this script again
        print("Launching:", shlex.join(launch[0]), flush=True)
        os.execve(launch[0][0], *launch)
    tags = {**git_state(Path.cwd()), "openmp_wait": openmp.describe(os.environ), **{
        k: os.environ[k] for k in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV") if k in os.environ}}
    if world.is_main:
        print(f"Training on {device} ({world.size} process(es) x {torch.get_num_threads()} CPU "
              f"threads); tracking at {uri}" + (f"; {note}" if note else ""), flush=True)

    # a progress bar within each epoch, only when a person is watching
    progress = None
    if sys.stderr.isatty() and world.is_main:
        from tqdm import tqdm

        progress = tqdm(leave=False, unit="batch")

    def show(line: str) -> None:
        if progress is not None:
            progress.reset()
        print(line, flush=True)

    # the run is named after the DVC experiment, else after the model and the time
    name = os.environ.get("DVC_EXP_NAME") or (
        f"{params.registered_model}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}")
    run_training(params, args.raw, stats, outputs, device, tracker, tags,
                 print_fn=show, on_step=progress.update if progress is not None else None,
                 world=world, run_name=name)
    distributed.stop(world)


if __name__ == "__main__":
    run_stage(main)
