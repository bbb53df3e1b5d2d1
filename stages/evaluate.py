"""Stage `evaluate`: score the registered model that `train` produced on the full test set.

Writes DVC metrics and plots (confusion matrix, misclassified digits), logs the same to the
training run in MLflow and tags the registered model version with the results.
    python stages/evaluate.py --params params.yaml --raw data/raw --run-info models/run.json \
        --metrics metrics/evaluate.json --report reports/evaluation.json \
        --confusion plots/confusion.json --confusion-png plots/confusion.png \
        --misclassified plots/misclassified.png
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from mnist_pipeline.errors import PipelineError, run_stage
from mnist_pipeline.evaluate_stage import EvaluateOutputs, run_evaluation
from mnist_pipeline.io import check_targets, read_json
from mnist_pipeline.params import load_params
from mnist_pipeline.registry import check_run_info
from mnist_pipeline.runtime import tune_cpu_allocator
from mnist_pipeline.tracking import MlflowTracker, resolve_tracking


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("params", "raw", "run-info", "metrics", "report", "confusion",
                 "misclassified"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    parser.add_argument("--confusion-png", type=Path, help="the matrix with counts, as a PNG")
    args = parser.parse_args(argv)

    params = load_params(args.params, "evaluate")
    run_info = read_json(args.run_info, keys=("run_id",))
    if not run_info.get("registry_uri"):
        raise PipelineError(f"{args.run_info} names no registered model: was train tracked?")
    outputs = EvaluateOutputs(args.metrics, args.report, args.confusion, args.misclassified,
                              args.confusion_png)
    check_targets(*dataclasses.astuple(outputs))
    uri, _ = resolve_tracking(os.environ, Path.cwd())
    tracker = MlflowTracker(uri, experiment="")
    tracker.check()
    check_run_info(tracker.client(), run_info, uri, str(args.run_info))
    tune_cpu_allocator()  # faster CPU inference, same numbers
    report = run_evaluation(params, args.raw, run_info, outputs, tracker)
    print(f"{run_info['registry_uri']}: test accuracy {report['test_accuracy']:.4%}, "
          f"loss {report['test_loss']:.4f}, macro F1 {report['macro_f1']:.4f}")


if __name__ == "__main__":
    run_stage(main)
