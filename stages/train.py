"""Stage `train`: train the CNN, track the run in MLflow and register the model.

Runtime choices (not DVC params): --device / $MNIST_DEVICE (auto, cpu, cuda, cuda:N),
--threads / $MNIST_THREADS (CPU threads), $MLFLOW_TRACKING_URI (default: ./mlruns, SQLite).
    python stages/train.py --params params.yaml --raw data/raw --stats metrics/stats.json \
        --weights models/model.pt --metrics metrics/train.json \
        --history plots/train_history.json --run-info models/run.json \
        --checkpoint checkpoints/train.pt
A run killed at any moment resumes from its last finished epoch when re-run (same MLflow run).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from mnist_pipeline.errors import run_stage
from mnist_pipeline.io import read_json
from mnist_pipeline.params import load_params
from mnist_pipeline.runtime import select_device
from mnist_pipeline.tracking import MlflowTracker, git_state, resolve_tracking
from mnist_pipeline.train_stage import TrainOutputs, run_training


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("params", "raw", "stats", "weights", "metrics", "history", "run-info"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, help="resumable state, written every epoch")
    parser.add_argument("--device", default=os.environ.get("MNIST_DEVICE", "auto"))
    parser.add_argument("--threads", type=int, default=os.environ.get("MNIST_THREADS", "0"))
    args = parser.parse_args(argv)

    params = load_params(args.params, "train")
    # When a tracking server goes away mid-run, give up on a request in seconds, not minutes:
    # metrics are kept and re-sent (see mnist_pipeline.tracking).
    for name, value in (("MAX_RETRIES", "2"), ("BACKOFF_FACTOR", "1"), ("TIMEOUT", "20")):
        os.environ.setdefault(f"MLFLOW_HTTP_REQUEST_{name}", value)
    stats = read_json(args.stats)
    device = select_device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    uri, artifacts = resolve_tracking(os.environ, Path.cwd())
    tracker = MlflowTracker(uri, params.experiment_name, artifacts)
    tracker.check()  # an unreachable store fails now, not after training
    tags = {**git_state(Path.cwd()), **{
        k: os.environ[k] for k in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV") if k in os.environ}}
    print(f"Training on {device} ({torch.get_num_threads()} CPU threads); tracking at {uri}")

    # a progress bar within each epoch, only when a person is watching
    progress = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        progress = tqdm(leave=False, unit="batch")

    def show(line: str) -> None:
        if progress is not None:
            progress.reset()
        print(line, flush=True)

    outputs = TrainOutputs(args.weights, args.metrics, args.history, args.run_info,
                           args.checkpoint)
    run_training(params, args.raw, stats, outputs, device, tracker, tags, print_fn=show,
                 on_step=progress.update if progress is not None else None)

if __name__ == "__main__":
    run_stage(main)
