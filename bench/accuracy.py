"""Train named recipes over several seeds and record their test accuracy: per seed, mean,
spread, and the accuracy of the ensemble of each recipe's seeds.

    python bench/accuracy.py --recipe reference --recipe best-single --seeds 0 1 2 --threads 1
    python bench/accuracy.py --recipe best-single:amp=bf16 --seeds 0 1 2 \
        --json bench/results/bf16.json

A recipe may carry train overrides after a colon (`NAME:key=value,key=value`): the recipe
with those keys changed, e.g. `best-single:amp=bf16` for the default recipe under bf16
autocast.

Trains with the train stage's own code (`train_stage.run_training`, no tracking) on data/raw
with data/stats.json, and scores every model with the evaluate stage's own function
(`evaluate_stage.score_test_set`) on the deployable model that the train stage registers.
Writes bench/results/accuracy.json, from which `python bench/report.py` builds the accuracy
table of bench/RESULTS.md. Hours on a 2-core CPU: run on demand, never in tests. Seeds can
run in separate invocations (e.g. one per core with --threads 1); `--reuse` then scores the
weights that they left under --out instead of training again.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from mnist_pipeline.checkpoint import load_state_file
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.evaluate_stage import score_test_set
from mnist_pipeline.inference import BATCH_SIZE
from mnist_pipeline.io import read_json, write_json
from mnist_pipeline.model import EnsembleModel, MnistCNN
from mnist_pipeline.params import load_params
from mnist_pipeline.recipes import apply_recipe, load_recipe
from mnist_pipeline.registry import deployable
from mnist_pipeline.runtime import cpu_model, select_device
from mnist_pipeline.train_stage import TrainOutputs, run_training


def deployed(weights: Path, stats: dict[str, Any], tta: bool) -> torch.nn.Module:
    """The model the train stage registers for these weights: pixels in, probabilities out."""
    net = MnistCNN()
    net.load_state_dict(load_state_file(weights))
    return deployable(net, stats["mean"], stats["std"], tta)


def train_seed(params: Any, seed: int, folder: Path, args: argparse.Namespace,
               stats: dict[str, Any]) -> Path:
    """Weights of `params` trained with `seed` under `folder` (reused with --reuse)."""
    outputs = TrainOutputs(*(folder / f for f in ("model.pt", "train.json", "history.json",
                                                   "run.json")))
    if not (args.reuse and outputs.weights.exists()):
        seeded = apply_recipe(params, {"train": {"seed": seed}})
        run_training(seeded, args.raw, stats, outputs, select_device(args.device),
                     print_fn=lambda line: print(f"[{folder.name}] {line}", flush=True))
    return outputs.weights


def split_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'best-single:amp=bf16,epochs=3' -> ('best-single', {'amp': 'bf16', 'epochs': 3})."""
    name, _, rest = spec.partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"accuracy: {spec!r}: write overrides as key=value")
        overrides[key.strip()] = yaml.safe_load(value)
    return name, overrides


def measure_recipe(spec: str, args: argparse.Namespace, stats: dict[str, Any]) -> dict[str, Any]:
    """Every seed of recipe `spec` (a name, optionally with overrides), scored, and the
    ensemble of the seeds."""
    name, overrides = split_spec(spec)
    try:
        params = apply_recipe(apply_recipe(load_params(args.params, "train"),
                                           load_recipe(args.recipes / f"{name}.yaml")),
                              {"train": overrides})
    except PipelineError as exc:
        raise SystemExit(f"accuracy: {spec}: {exc}") from None
    folder = name + "".join(f"-{k}-{v}" for k, v in overrides.items())
    models, runs = [], []
    for seed in args.seeds:
        weights = train_seed(params, seed, args.out / f"{folder}-seed{seed}", args, stats)
        trained = read_json(weights.with_name("train.json"))
        models.append(deployed(weights, stats, params.tta))
        accuracy = score_test_set(models[-1], args.raw, BATCH_SIZE).report["test_accuracy"]
        runs.append({"seed": seed, "test_accuracy": accuracy,
                     "train_seconds": trained["duration_seconds"]})
        print(f"{spec} seed {seed}: test accuracy {accuracy:.2%}", flush=True)
    accuracies = [r["test_accuracy"] for r in runs]
    ensemble = None
    if len(models) > 1:
        ensemble = score_test_set(EnsembleModel(models).eval(), args.raw,
                                  BATCH_SIZE).report["test_accuracy"]
    return {"recipe": spec, "name": name, "overrides": overrides, "epochs": params.epochs,
            "runs": runs,
            "train_seconds": statistics.median(r["train_seconds"] for r in runs),
            "mean": statistics.mean(accuracies),
            "stdev": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "min": min(accuracies), "max": max(accuracies), "ensemble": ensemble}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", action="append", required=True,
                        help="recipes/NAME.yaml, optionally NAME:key=value,... (train overrides)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--recipes", type=Path, default=Path("recipes"))
    parser.add_argument("--raw", type=Path, default=Path("data/raw"))
    parser.add_argument("--stats", type=Path, default=Path("data/stats.json"))
    parser.add_argument("--out", type=Path, default=Path("bench/out/accuracy"),
                        help="trained weights, one folder per recipe and seed")
    parser.add_argument("--json", type=Path, default=Path("bench/results/accuracy.json"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's)")
    parser.add_argument("--reuse", action="store_true",
                        help="score seeds already trained under --out instead of retraining")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    stats = read_json(args.stats)
    results = [measure_recipe(name, args, stats) for name in args.recipe]
    write_json(args.json, {
        "command": " ".join(["python", "bench/accuracy.py", *sys.argv[1:]]),
        "machine": {"cpu": cpu_model(),
                    "device": str(select_device(args.device)), "threads": args.threads,
                    "torch": torch.__version__},
        "results": results,
    })
    for r in results:
        ensemble = f"{r['ensemble']:.2%}" if r["ensemble"] is not None else "-"
        print(f"{r['recipe']}: mean {r['mean']:.2%} over seeds {args.seeds}, "
              f"stdev {r['stdev']:.2%}, ensemble {ensemble}")


if __name__ == "__main__":
    main()
