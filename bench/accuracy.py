"""Train named recipes over several seeds and print their test accuracy: mean, spread, epochs
and training time on this machine; then the ensemble of each recipe's seeds.

    python bench/accuracy.py --recipe reference --recipe best-single --seeds 0 1 2 \
        --json bench/out/accuracy.json
Runs the project's own training (mnist_pipeline.train_workflow.run_training, no tracking) on
data/raw with metrics/stats.json. Hours on a 2-core CPU: run on demand, not in tests. Seeds can
run in separate invocations (e.g. one per core with --threads 1); `--reuse` then builds the
table and the ensemble from what they left under --out. "train s" is training time alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from mnist_pipeline.data import load_split
from mnist_pipeline.io import read_json, write_json
from mnist_pipeline.model import DeployableModel, EnsembleModel, MnistCNN
from mnist_pipeline.params import load_params
from mnist_pipeline.recipes import apply_recipe, load_recipe
from mnist_pipeline.train import select_device
from mnist_pipeline.train_workflow import TrainOutputs, run_training


def ensemble_accuracy(weights: list[Path], stats: dict, tta: bool, raw: Path) -> float:
    """Test accuracy of the averaged probabilities of the models in `weights`."""
    images, labels = load_split(raw, "test")
    members = []
    for path in weights:
        net = MnistCNN()
        net.load_state_dict(torch.load(path, weights_only=True))
        members.append(DeployableModel(net, stats["mean"], stats["std"], tta))
    model = EnsembleModel(members).eval()
    pixels = torch.from_numpy(images[:, None].astype("float32") / 255.0)
    with torch.no_grad():
        probs = torch.cat([model(pixels[i : i + 1000]) for i in range(0, len(pixels), 1000)])
    return float((probs.argmax(1).numpy() == labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", action="append", required=True, help="recipes/NAME.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--raw", type=Path, default=Path("data/raw"))
    parser.add_argument("--stats", type=Path, default=Path("metrics/stats.json"))
    parser.add_argument("--out", type=Path, default=Path("bench/out/accuracy"))
    parser.add_argument("--json", type=Path, help="write the results as JSON too")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's)")
    parser.add_argument("--reuse", action="store_true",
                        help="take seeds already trained under --out instead of retraining")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = select_device(args.device)
    stats = read_json(args.stats)
    base = load_params("params.yaml", "train")
    results = []
    for name in args.recipe:
        params = apply_recipe(base, load_recipe(Path("recipes") / f"{name}.yaml"))
        runs = []
        for seed in args.seeds:
            folder = args.out / f"{name}-seed{seed}"
            outputs = TrainOutputs(*(folder / f for f in ("model.pt", "train.json",
                                                           "history.json", "run.json")))
            seeded = apply_recipe(params, {"train": {"seed": seed}})
            if args.reuse and outputs.metrics.exists() and outputs.weights.exists():
                metrics = read_json(outputs.metrics)  # trained by an earlier invocation
            else:
                metrics = run_training(seeded, args.raw, stats, outputs, device,
                                       print_fn=lambda line, n=name, s=seed: print(
                                           f"[{n} seed {s}] {line}", flush=True))
            runs.append({"seed": seed, "test_accuracy": metrics["test_accuracy"],
                         "seconds": metrics["duration_seconds"],
                         "weights": str(outputs.weights)})
        accs = [r["test_accuracy"] for r in runs]
        results.append({
            "recipe": name, "epochs": params.epochs, "runs": runs,
            "mean": statistics.mean(accs), "stdev": statistics.stdev(accs) if len(accs) > 1 else 0,
            "seconds_mean": statistics.mean(r["seconds"] for r in runs),
            "ensemble": ensemble_accuracy([Path(r["weights"]) for r in runs], stats, params.tta,
                                          args.raw) if len(runs) > 1 else None,
        })

    print(f"\n{'recipe':<14} {'epochs':>6} {'seeds':>5} {'mean acc':>9} {'stdev':>7} "
          f"{'min':>7} {'max':>7} {'train s':>8} {'ensemble':>9}")
    for r in results:
        accs = [x["test_accuracy"] for x in r["runs"]]
        ens = f"{r['ensemble']:.2%}" if r["ensemble"] is not None else "-"
        print(f"{r['recipe']:<14} {r['epochs']:>6} {len(accs):>5} {r['mean']:>9.2%} "
              f"{r['stdev']:>7.2%} {min(accs):>7.2%} {max(accs):>7.2%} "
              f"{r['seconds_mean']:>8.0f} {ens:>9}")
    print(f"device: {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.json:
        write_json(args.json, {"device": str(device), "torch": torch.__version__,
                               "results": results})
    print(json.dumps({r["recipe"]: r["mean"] for r in results}))


if __name__ == "__main__":
    main()
