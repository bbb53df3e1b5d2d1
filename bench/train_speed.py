"""Benchmark the project's training path against the reference loop, on one machine.

In one process, alternating when repeated, runs (a) the reference loop as published
(bench/reference.py: torchvision MNIST with ToTensor + Normalize, DataLoader(batch_size=100,
shuffle=True), the same CNN, Adam, ReduceLROnPlateau) and (b) the project's path (to_tensor,
build_state, fit -> train_one_epoch, evaluate from `mnist_pipeline.train`) in one or more
variants of the speed options of `TrainParams`, for the same number of epochs. Prints seconds
per epoch, images per second, project/reference and the test accuracy each reached; `--json`
writes the same numbers. Needs only torch, torchvision and numpy (no mlflow, dvc or PyYAML).

  python bench/train_speed.py --device cpu --epochs 1 --json bench/out/cpu.json
  python bench/train_speed.py --device cpu --steps 100 --repeats 3 --variant default \
      --variant fused --variant fused+channels_last
  python bench/train_speed.py --device cuda --repeats 3   # also: time to 99.5% (--recipe)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.deterministic

ROOT = Path(__file__).resolve().parents[1]
# Measure this checkout's code, installed or not (the GPU machine has no editable install).
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "bench")]

from mnist_pipeline.data import load_split  # noqa: E402
from mnist_pipeline.params import TrainParams  # noqa: E402
from mnist_pipeline.train import (  # noqa: E402
    build_state,
    configure_determinism,
    evaluate,
    fit,
    to_tensor,
)
from reference import reference_epoch, reference_loaders, train_reference  # noqa: E402

# Variant tokens -> TrainParams overrides; join tokens with '+' ("fused+channels_last").
TOKENS: dict[str, dict[str, Any]] = {
    "default": {},
    "fused": {"fused_optimizer": True},
    "channels_last": {"channels_last": True},
    "compile": {"compile": True},
    "bf16": {"amp": "bf16"},
    "nondeterministic": {"cuda_deterministic": False},
}
TARGET_ACCURACY = 0.995


def parse_variant(name: str) -> dict[str, Any]:
    """'fused+channels_last' -> {'fused_optimizer': True, 'channels_last': True}."""
    overrides: dict[str, Any] = {}
    for token in name.split("+"):
        if token not in TOKENS:
            raise argparse.ArgumentTypeError(
                f"unknown variant token {token!r}; use {', '.join(TOKENS)} joined by '+'")
        overrides.update(TOKENS[token])
    return overrides


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on, for the table header and the JSON."""
    import torchvision

    info: dict[str, Any] = {
        "device": device.type, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "python": platform.python_version(),
    }
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass
class Data:
    """The project's tensors on the device (one copy per memory format) and the loaders."""

    device: torch.device
    images: np.ndarray
    labels: torch.Tensor
    test_images: np.ndarray
    test_labels: torch.Tensor
    mean: float
    std: float
    loaders: tuple
    cache: dict = dataclasses.field(default_factory=dict)

    def tensors(self, channels_last: bool) -> tuple[torch.Tensor, ...]:
        """(x, y, x_test, y_test) on the device, normalised as the pipeline does."""
        if channels_last not in self.cache:
            self.cache[channels_last] = (
                to_tensor(self.images, self.mean, self.std, self.device, channels_last),
                self.labels, to_tensor(self.test_images, self.mean, self.std, self.device,
                                       channels_last), self.test_labels)
        return self.cache[channels_last]


def load_data(raw_dir: Path, stats_path: Path, device: torch.device, scratch: Path) -> Data:
    images, labels = load_split(raw_dir, "train")
    test_images, test_labels = load_split(raw_dir, "test")
    if stats_path.is_file():
        stats = json.loads(stats_path.read_text())
        mean, std = float(stats["mean"]), float(stats["std"])
    else:  # the same numbers compute-stats writes: pixel mean and std over the training set
        pixels = images.astype(np.float64) / 255.0
        mean, std = float(pixels.mean()), float(pixels.std())
    return Data(device, images, torch.from_numpy(labels).to(device), test_images,
                torch.from_numpy(test_labels).to(device), mean, std,
                reference_loaders(raw_dir, scratch))


def global_flags() -> tuple[bool, bool, bool]:
    return (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
            torch.utils.deterministic.fill_uninitialized_memory)


def set_global_flags(flags: tuple[bool, bool, bool]) -> None:
    """Undo configure_determinism, so that the reference runs with torch's defaults."""
    torch.use_deterministic_algorithms(flags[0])
    torch.backends.cudnn.benchmark = flags[1]
    torch.utils.deterministic.fill_uninitialized_memory = flags[2]


def project_inputs(data: Data, params: TrainParams, steps: int) -> tuple[torch.Tensor, ...]:
    """The training tensors, or with `steps` a fixed random subset of steps x batch images."""
    x, y, x_test, y_test = data.tensors(params.channels_last)
    if steps:
        generator = torch.Generator().manual_seed(params.seed)
        chosen = torch.randperm(len(x), generator=generator)[: steps * params.batch_size]
        chosen = chosen.to(data.device)
        x, y = x[chosen], y[chosen]
        if params.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
    return x, y, x_test, y_test


def run_project(
    data: Data, params: TrainParams, epochs: int, steps: int, measure_accuracy: bool = True,
) -> dict[str, float]:
    """The pipeline's own path: configure_determinism, build_state, fit, evaluate."""
    configure_determinism(data.device, params.cuda_deterministic)
    x, y, x_test, y_test = project_inputs(data, params, steps)
    params = dataclasses.replace(params, epochs=epochs)
    state = build_state(params, data.device)
    sync(data.device)
    start = time.perf_counter()
    fit(state, params, x, y)
    sync(data.device)
    seconds = time.perf_counter() - start
    images = epochs * (len(x) // params.batch_size) * params.batch_size
    accuracy = float("nan")
    if measure_accuracy:
        accuracy = evaluate(state.model, x_test, y_test, params.eval_batch_size,
                            params.amp)["accuracy"]
    return {"seconds": seconds, "images": images, "test_accuracy": accuracy}


def run_reference(data: Data, epochs: int, steps: int, defaults: tuple) -> dict[str, float]:
    set_global_flags(defaults)
    return train_reference(data.loaders, data.device, epochs, steps or None)


def warm_up(data: Data, params: TrainParams | None, steps: int, defaults: tuple) -> float:
    """A few untimed steps on a throwaway model (for 'compile': the compilation); seconds."""
    start = time.perf_counter()
    if steps and params is None:
        set_global_flags(defaults)
        from mnist_pipeline.model import MnistCNN

        model = MnistCNN().to(data.device)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
        reference_epoch(model, optimizer, data.loaders[0], data.device, steps)
    elif steps and params is not None:
        run_project(data, params, 1, steps, measure_accuracy=False)
    return time.perf_counter() - start


def run_recipe(data: Data, params: TrainParams, epochs: int, steps: int) -> dict[str, Any]:
    """The whole recipe through fit, test accuracy after each epoch (not timed): time to 99.5%."""
    configure_determinism(data.device, params.cuda_deterministic)
    x, y, x_test, y_test = project_inputs(data, params, steps)
    params = dataclasses.replace(params, epochs=epochs)
    state = build_state(params, data.device)
    accuracies: list[float] = []

    def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
        accuracies.append(evaluate(state.model, x_test, y_test, params.eval_batch_size,
                                   params.amp)["accuracy"])

    history = fit(state, params, x, y, on_epoch_end)
    elapsed = np.cumsum([h["epoch_seconds"] for h in history]).tolist()
    hit = next((i for i, a in enumerate(accuracies) if a >= TARGET_ACCURACY), None)
    return {
        "epochs": epochs, "train_seconds": elapsed[-1], "final_accuracy": accuracies[-1],
        "best_accuracy": max(accuracies), "target_accuracy": TARGET_ACCURACY,
        "epoch_reached": None if hit is None else hit + 1,
        "seconds_to_target": None if hit is None else elapsed[hit],
        "accuracy_per_epoch": accuracies,
    }


def benchmark(
    data: Data, variants: list[str], args: argparse.Namespace, defaults: tuple
) -> tuple[dict[str, list[dict]], dict[str, float]]:
    """Warm every row up once, then run them `repeats` times, alternating (ABBA order)."""
    base = TrainParams()
    params = {v: dataclasses.replace(base, **parse_variant(v)) for v in variants}
    names = ["reference", *variants]
    warmups = {n: warm_up(data, params.get(n), args.warmup, defaults) for n in names}
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for repeat in range(args.repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            if name == "reference":
                run = run_reference(data, args.epochs, args.steps, defaults)
            else:
                run = run_project(data, params[name], args.epochs, args.steps)
            runs[name].append(run)
            print(f"[{repeat + 1}/{args.repeats}] {name}: {run['seconds']:.2f} s, "
                  f"{run['images'] / run['seconds']:.0f} images/s, "
                  f"accuracy {run['test_accuracy']:.4f}", file=sys.stderr, flush=True)
    return runs, warmups


def summarise(
    name: str, runs: list[dict], warmup: float, reference_ips: float, epoch_images: int
) -> dict:
    """One table row: medians over the repeats; seconds per (whole) epoch from the rate."""
    ips = statistics.median(r["images"] / r["seconds"] for r in runs)
    return {
        "name": name,
        "overrides": None if name == "reference" else parse_variant(name),
        "seconds_per_epoch": epoch_images / ips,
        "images_per_second": ips,
        "ratio": ips / reference_ips,
        "test_accuracy": statistics.median(r["test_accuracy"] for r in runs),
        "warmup_seconds": warmup,
        "runs": runs,
    }


def make_report(
    data: Data, runs: dict, warmups: dict, recipe: list | None, args: argparse.Namespace
) -> dict[str, Any]:
    epoch_images = len(data.images) // 100 * 100
    reference_ips = statistics.median(r["images"] / r["seconds"] for r in runs["reference"])
    rows = [summarise(n, runs[n], warmups[n], reference_ips, epoch_images) for n in runs]
    accuracy_after = (f"{args.epochs} epoch(s) of {args.steps} steps" if args.steps
                      else f"{args.epochs} full epoch(s)")
    return {
        "machine": machine_info(data.device),
        "settings": {
            "device": str(data.device), "epochs": args.epochs, "steps": args.steps or None,
            "repeats": args.repeats, "warmup_steps": args.warmup, "batch_size": 100,
            "accuracy_after": accuracy_after, "stats": {"mean": data.mean, "std": data.std},
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        },
        "rows": rows,
        "speedup": rows[1]["ratio"],  # the first project variant (default unless named)
        "speedups": {row["name"]: row["ratio"] for row in rows[1:]},
        "recipe": recipe,
    }


def format_table(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    device = f"GPU {m['gpu']} (CUDA {m['cuda']})" if "gpu" in m else "CPU"
    steps = (f"{s['steps']} steps per epoch, extrapolated to a whole epoch" if s["steps"]
             else "whole epochs")
    lines = [
        f"machine: {device}; {m['cpu']}, {m['cpu_count']} CPUs, {m['threads']} torch threads; "
        f"torch {m['torch']}, torchvision {m['torchvision']}",
        f"run: {s['epochs']} epoch(s), {steps}; median of {s['repeats']} alternating repeat(s); "
        f"test accuracy after {s['accuracy_after']}",
        f"{'row':<32}{'s/epoch':>9}{'images/s':>10}{'vs ref':>8}{'test acc':>10}{'warm-up s':>11}",
    ]
    for row in report["rows"]:
        name = row["name"] if row["name"] == "reference" else f"project {row['name']}"
        lines.append(f"{name:<32}{row['seconds_per_epoch']:>9.2f}{row['images_per_second']:>10.0f}"
                     f"{row['ratio']:>7.2f}x{row['test_accuracy']:>10.2%}"
                     f"{row['warmup_seconds']:>11.1f}")
    for name, r in zip(report["speedups"], report["recipe"] or [], strict=False):
        reached = (f"{r['target_accuracy']:.1%} at epoch {r['epoch_reached']} after "
                   f"{r['seconds_to_target']:.1f} s" if r["epoch_reached"]
                   else f"{r['target_accuracy']:.1%} not reached")
        lines.append(f"recipe {name}: {r['epochs']} epochs in {r['train_seconds']:.1f} s of "
                     f"training, final {r['final_accuracy']:.2%}; {reached}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--epochs", type=int, default=1, help="epochs per timed run (default 1)")
    p.add_argument("--steps", type=int, default=0,
                   help="time only N steps per epoch, extrapolated; accuracy is measured "
                        "after those steps (default 0: whole epochs)")
    p.add_argument("--repeats", type=int, default=1, help="alternating repeats; medians")
    p.add_argument("--variant", action="append", type=str,
                   help=f"project row, tokens joined by '+': {', '.join(TOKENS)} "
                        "(repeatable; default: default)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per row first")
    p.add_argument("--recipe", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the whole recipe per variant: time to 99.5%% test accuracy "
                        "(default: on for cuda)")
    p.add_argument("--recipe-epochs", type=int, default=TrainParams().epochs)
    p.add_argument("--raw", type=Path, default=ROOT / "data" / "raw", help="MNIST IDX folder")
    p.add_argument("--stats", type=Path, default=ROOT / "metrics" / "stats.json")
    p.add_argument("--json", type=Path, help="write the numbers here as JSON")
    args = p.parse_args(argv)
    for variant in args.variant or []:
        try:
            parse_variant(variant)
        except argparse.ArgumentTypeError as exc:
            p.error(str(exc))
    if min(args.epochs, args.repeats, args.recipe_epochs) < 1 or min(args.steps, args.warmup) < 0:
        p.error("--epochs, --repeats and --recipe-epochs must be >= 1; --steps, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print(f"--device {args.device}: no CUDA GPU is available", file=sys.stderr)
            return 2
        # as configure_determinism does, but before any cuBLAS use (the reference runs first)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = args.variant or ["default"]
    defaults = global_flags()
    with tempfile.TemporaryDirectory(prefix="mnist-tv-") as scratch:
        data = load_data(args.raw, args.stats, device, Path(scratch))
        runs, warmups = benchmark(data, variants, args, defaults)
        recipe = None
        if args.recipe if args.recipe is not None else device.type == "cuda":
            recipe = [run_recipe(data, dataclasses.replace(TrainParams(), **parse_variant(v)),
                                 args.recipe_epochs, args.steps) for v in variants]
    set_global_flags(defaults)
    report = make_report(data, runs, warmups, recipe, args)
    print(format_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
