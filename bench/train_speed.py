"""Benchmark the project's training path against the reference loop, on one machine.

One invocation runs, alternating when repeated, (a) the reference loop as published
(bench/reference.py: torchvision MNIST with ToTensor + Normalize, DataLoader(batch_size=100,
shuffle=True), the same CNN, Adam, ReduceLROnPlateau) and (b) the project's path (to_tensor,
configure_determinism, build_state, fit, validate from `mnist_pipeline.loop`) with the field
defaults of `TrainParams` - the reference recipe, so the same numerics (not params.yaml's
recipe) - in one or more variants of its speed options, for the same number of epochs; prints
seconds per epoch, images per second, project/reference and the test accuracy each reached.
Every timed run is a fresh child process, so that no run inherits another's allocator state,
global flags or caches; each child first runs a few untimed warm-up steps (for `compile`, the
compilation: reported as warm-up seconds). `--json` writes the same numbers. Needs only torch,
torchvision and numpy (no mlflow or dvc; PyYAML only for --recipe-file).

  python bench/train_speed.py --device cpu --epochs 1 --json bench/out/cpu.json
  python bench/train_speed.py --device cpu --steps 100 --repeats 3 --variant default \
      --variant plain --variant plain+channels_last     (tokens apply left to right)
  python bench/train_speed.py --device cuda --repeats 3 --variant default --variant bf16
      (on CUDA also the whole recipe per variant: time to 99.5% test accuracy; see --recipe)
  python bench/train_speed.py --device cuda --repeats 3 --variant default --variant bf16 \
      --recipe-file recipes/best-single.yaml     (`make bench-gpu`: the recipe rows train the
      project's default recipe, scored as the train stage scores it: EMA weights, TTA)
  python bench/train_speed.py --device cpu --steps 150 --repeats 3 --variant default \
      --variant ddp2      (ddp2: 2 processes under torchrun, data parallel, threads shared)
  python bench/train_speed.py --device cpu --steps 150 --repeats 3 --threads 2 \
      --variant default --variant unfused --load 1 --loaded reference --loaded default
      (--load N: the --loaded rows, default all, run again beside N busy processes)
  python bench/train_speed.py --device cpu --steps 150 --repeats 3 --convolutions
      (also a row of the default's oneDNN convolutions alone: the speed no fp32 change
      elsewhere in the step can pass)

Under `--load N`, each loaded run gets N competing processes that spin on one core each
(`python -c` of a bounded busy loop), started just before the run's process and killed just
after it; a loaded row's ratio is to the reference under the same load, and its slowdown is
its loaded time over its quiet time. The project's rows wait at OpenMP barriers as the train
stage makes them (a short spin, `openmp.wait_policy`); the `longspin` variant is the default
with libgomp's own long spin instead, which shows what that choice costs and saves.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
# Measure this checkout's code, whether or not the package is installed.
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "bench")]

import convolutions  # noqa: E402  (bench/convolutions.py)
from mnist_pipeline import distributed, openmp  # noqa: E402
from mnist_pipeline.data import SPLITS, load_split  # noqa: E402
from mnist_pipeline.fused import status as fused_status  # noqa: E402
from mnist_pipeline.io import write_json  # noqa: E402
from mnist_pipeline.loop import build_state, fit, to_tensor, validate  # noqa: E402
from mnist_pipeline.params import ParamsError, TrainParams  # noqa: E402
from mnist_pipeline.runtime import (  # noqa: E402
    configure_determinism,
    cpu_model,
    tune_cpu_allocator,
)
from reference import (  # noqa: E402
    CNN,
    LEARNING_RATE,
    reference_epoch,
    reference_loaders,
    train_reference,
)

LONG_SPIN = "longspin"
# Variant tokens -> TrainParams overrides; join tokens with '+' ("fused+channels_last").
TOKENS: dict[str, dict[str, Any]] = {
    "default": {},
    # the fp32 defaults turned off: NCHW layout, for-loop Adam, eager BatchNorm/ReLU/max-pool
    # (rounding-level differences)
    "plain": {"channels_last": False, "fused_optimizer": False, "fused_kernels": False},
    "unfused": {"fused_kernels": False},  # the eager modules instead of the fused kernels
    "fused": {"fused_optimizer": True},
    "fused_kernels": {"fused_kernels": True},
    "channels_last": {"channels_last": True},
    "compile": {"compile": True},
    "bf16": {"amp": "bf16"},
    "nondeterministic": {"cuda_deterministic": False},
    # 2 processes under torchrun (DistributedDataParallel; gloo on the CPU, NCCL on CUDA),
    # the cores shared between them
    "ddp2": {"nproc": 2},
    # no params: the run's OpenMP threads wait as libgomp does by default (a long spin), not
    # as the train stage makes them (openmp.wait_policy: a short spin)
    LONG_SPIN: {},
}
TARGET_ACCURACY = 0.995
# One competing process: a busy loop on one core that ends by itself after an hour, should
# the benchmark die before it kills it.
BUSY_LOOP = "import time\nend = time.monotonic() + 3600\nwhile time.monotonic() < end: pass"
RESULT_MARK = "BENCH-RESULT "  # the child's one line of JSON on stdout
# The row of the default's oneDNN convolutions alone (--convolutions); not a variant.
CONVOLUTIONS = "convolutions"


def parse_variant(name: str) -> dict[str, Any]:
    """'fused+channels_last' -> {'fused_optimizer': True, 'channels_last': True}."""
    overrides: dict[str, Any] = {}
    for token in name.split("+"):
        if token not in TOKENS:
            raise ValueError(
                f"unknown variant token {token!r}; use {', '.join(TOKENS)} joined by '+'")
        overrides.update(TOKENS[token])
    return overrides


def variant_params(name: str) -> TrainParams:
    return dataclasses.replace(TrainParams(), **parse_variant(name))


def recipe_params(args: argparse.Namespace, variant: str) -> TrainParams:
    """A recipe row's params: --recipe-file's train overrides (a YAML file like recipes/*.yaml;
    this needs PyYAML), then the variant's tokens, then --recipe-epochs when given."""
    params = TrainParams()
    if args.recipe_file is not None:
        from mnist_pipeline.recipes import apply_recipe, load_recipe

        params = apply_recipe(params, load_recipe(args.recipe_file))
    params = dataclasses.replace(params, **parse_variant(variant))
    if params.val_size or params.train_subset:
        raise ParamsError(f"--recipe-file {args.recipe_file}: the recipe rows train on all the "
                          "training images with no validation split (train.val_size and "
                          "train.train_subset 0)")
    return dataclasses.replace(params, epochs=args.recipe_epochs or params.epochs)


BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")  # CPU instructions for bf16 math


def bf16_flags() -> list[str]:
    """Which of BF16_FLAGS this CPU has (Linux's /proc/cpuinfo; none known elsewhere)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [flag for flag in BF16_FLAGS if flag in flags]


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on, for the table header and the JSON."""
    import torchvision

    info: dict[str, Any] = {
        "device": device.type, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "cpu_bf16": bf16_flags(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
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


def global_flags() -> dict[str, Any]:
    """The settings that the timings depend on, as the run left them."""
    return {
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "threads": torch.get_num_threads(),
        "openmp_wait": openmp.describe(os.environ),  # as libgomp read it when torch loaded
    }


def resolve_raw(raw_dir: Path, scratch: Path) -> Path:
    """`raw_dir` if it holds the four decompressed IDX files; else their .gz files from it,
    decompressed into `scratch` (so that a folder mirror of the .gz files will do)."""
    names = [name for split in SPLITS.values() for name in split]
    if all((raw_dir / name).is_file() for name in names):
        return raw_dir
    if not all((raw_dir / f"{name}.gz").is_file() for name in names):
        raise SystemExit(f"train_speed: {raw_dir} holds neither the MNIST IDX files nor .gz")
    out = scratch / "raw"
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        (out / name).write_bytes(gzip.decompress((raw_dir / f"{name}.gz").read_bytes()))
    return out


# --- one run, in a child process -------------------------------------------------------------

def project_tensors(
    args: argparse.Namespace, params: TrainParams, device: torch.device, steps: int,
) -> tuple[torch.Tensor, ...]:
    """(x, y, x_test, y_test) on the device as the pipeline makes them; with `steps`, x and y
    are a fixed random subset of steps x batch_size images (the same every epoch)."""
    images, labels = load_split(args.raw, "train")
    test_images, test_labels = load_split(args.raw, "test")
    if args.stats.is_file():
        stats = json.loads(args.stats.read_text())
        mean, std = float(stats["mean"]), float(stats["std"])
    else:  # what compute-stats writes: the pixel mean and std of the training set
        pixels = images.astype(np.float64) / 255.0
        mean, std = float(pixels.mean()), float(pixels.std())
    if steps:
        chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(1))
        chosen = chosen[: steps * params.batch_size].numpy()
        images, labels = images[chosen], labels[chosen]
    return (to_tensor(images, mean, std, device, params.channels_last),
            torch.from_numpy(labels).to(device),
            to_tensor(test_images, mean, std, device, params.channels_last),
            torch.from_numpy(test_labels).to(device))


def run_project(
    params: TrainParams, tensors: tuple[torch.Tensor, ...], epochs: int, device: torch.device,
    measure_accuracy: bool = True, world: distributed.World = distributed.SINGLE,
) -> dict[str, Any]:
    """The pipeline's own path: configure_determinism, build_state, fit, evaluate."""
    x, y, x_test, y_test = tensors
    params = dataclasses.replace(params, epochs=epochs)
    configure_determinism(device, params.cuda_deterministic)
    state = build_state(params, device, world=world)
    sync(device)
    start = time.perf_counter()
    fit(state, params, x, y, world=world)
    sync(device)
    seconds = time.perf_counter() - start
    accuracy = float("nan")
    if measure_accuracy and world.is_main:
        accuracy = validate(state.model, x_test, y_test, params.eval_batch_size,
                            params.amp)["accuracy"]
    images = epochs * (len(x) // params.batch_size) * params.batch_size
    return {"seconds": seconds, "images": images, "test_accuracy": accuracy}


def run_recipe(
    params: TrainParams, tensors: tuple[torch.Tensor, ...], device: torch.device,
) -> dict[str, Any]:
    """The whole recipe (params.epochs) through fit; test accuracy after each epoch (untimed)
    of the network the train stage would register (the weight average with EMA; shifted
    copies with TTA): time to 99.5%."""
    x, y, x_test, y_test = tensors
    configure_determinism(device, params.cuda_deterministic)
    state = build_state(params, device, len(x) // params.batch_size)
    accuracies: list[float] = []

    def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
        accuracies.append(validate(state.eval_model(), x_test, y_test, params.eval_batch_size,
                                   params.amp, params.tta)["accuracy"])

    history = fit(state, params, x, y, on_epoch_end)
    elapsed = np.cumsum([h["epoch_seconds"] for h in history]).tolist()
    hit = next((i for i, a in enumerate(accuracies) if a >= TARGET_ACCURACY), None)
    return {
        "epochs": params.epochs, "train_seconds": elapsed[-1], "final_accuracy": accuracies[-1],
        "best_accuracy": max(accuracies), "target_accuracy": TARGET_ACCURACY,
        "epoch_reached": None if hit is None else hit + 1,
        "seconds_to_target": None if hit is None else elapsed[hit],
        "accuracy_per_epoch": accuracies,
    }


def epoch_images(raw_dir: Path, batch_size: int = 100) -> int:
    """Images in one whole epoch (the last short batch dropped), from the labels' header."""
    count = int.from_bytes((raw_dir / "train-labels-idx1-ubyte").read_bytes()[4:8], "big")
    return count // batch_size * batch_size


def cpu_share(cpu_start: float, wall_start: float) -> float:
    """CPU seconds used per wall second and thread since the starts: well below 1 on an
    otherwise idle CPU means that something else was running (the timings suffered)."""
    wall = (time.perf_counter() - wall_start) * torch.get_num_threads()
    return (time.process_time() - cpu_start) / wall


def child_project(args: argparse.Namespace, row: str, device: torch.device,
                  world: distributed.World = distributed.SINGLE) -> dict[str, Any]:
    recipe = row.startswith("recipe:")
    params = (recipe_params(args, row.removeprefix("recipe:")) if recipe
              else variant_params(row))
    start = time.perf_counter()
    if args.warmup:  # untimed, on a throwaway model; for 'compile', the compilation
        run_project(params, project_tensors(args, params, device, args.warmup), 1, device,
                    measure_accuracy=False, world=world)
    warmup = time.perf_counter() - start
    tensors = project_tensors(args, params, device, args.steps)
    cpu, wall = time.process_time(), time.perf_counter()
    if recipe:
        result = run_recipe(params, tensors, device)
    else:
        result = run_project(params, tensors, args.epochs, device, world=world)
    return {**result, "warmup_seconds": warmup, "epoch_images": epoch_images(args.raw),
            "cpu_share": cpu_share(cpu, wall),
            "fused_kernels": fused_status(params, device),
            "processes": world.size, "threads_per_process": torch.get_num_threads()}


def child_reference(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mnist-tv-") as scratch:
        loaders = reference_loaders(args.raw, Path(scratch))
    start = time.perf_counter()
    if args.warmup:
        model = CNN().to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        reference_epoch(model, optimizer, loaders[0], device, args.warmup)
    warmup = time.perf_counter() - start
    cpu, wall = time.process_time(), time.perf_counter()
    result = train_reference(loaders, device, args.epochs, args.steps or None)
    return {**result, "warmup_seconds": warmup, "epoch_images": epoch_images(args.raw),
            "cpu_share": cpu_share(cpu, wall)}


def child_convolutions(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    params = variant_params("default")
    configure_determinism(device, params.cuda_deterministic)  # as run_project and fit
    if device.type == "cpu":
        tune_cpu_allocator()
    images = epoch_images(args.raw, params.batch_size)
    steps = args.steps or images // params.batch_size
    start = time.perf_counter()
    work = convolutions.prepare(params, device)
    convolutions.run(work, args.warmup)
    warmup = time.perf_counter() - start
    cpu, wall = time.process_time(), time.perf_counter()
    sync(device)
    convolutions.run(work, steps * args.epochs)
    sync(device)
    seconds = time.perf_counter() - wall
    return {"seconds": seconds, "images": args.epochs * steps * params.batch_size,
            "flops": sum(w.call.flops for w in work) * steps * args.epochs,
            "test_accuracy": None, "warmup_seconds": warmup, "epoch_images": images,
            "cpu_share": cpu_share(cpu, wall),
            "fused_kernels": fused_status(params, device)}


def child_main(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    world = distributed.SINGLE
    if distributed.launched_by_torchrun(os.environ):  # one rank of a data-parallel row
        params = variant_params(args.child)
        world, device, _ = distributed.join(os.environ, device, "auto", params.batch_size,
                                            params.compile, args.threads)
    elif args.threads:
        torch.set_num_threads(args.threads)
    if args.child == "reference":
        result = child_reference(args, device)
    elif args.child == CONVOLUTIONS:
        result = child_convolutions(args, device)
    else:
        result = child_project(args, args.child, device, world)
    if world.is_main:
        print(RESULT_MARK + json.dumps({**result, "flags": global_flags()}), flush=True)
    distributed.stop(world)
    return 0


# --- the parent: runs the children, alternating, and reports ---------------------------------

def busy_processes(count: int) -> list[subprocess.Popen]:
    """`count` competing busy processes, running."""
    return [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(count)]


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.kill()
    for process in processes:
        process.wait()


def child_wait_policy(row: str, environ: dict[str, str]) -> dict[str, str]:
    """The OpenMP wait variables a row's process adds to `environ`: the project's rows wait at
    barriers as the train stage makes them; the reference and `longspin` rows as libgomp
    does (unless the user set a policy: then every row keeps it)."""
    if row == "reference" or LONG_SPIN in row.split("+"):
        return {}
    return openmp.wait_policy(environ)


def run_child(args: argparse.Namespace, row: str, load: int = 0) -> dict[str, Any]:
    """One timed run in a fresh process (under torchrun for a row of several processes),
    beside `load` busy processes."""
    cmd = [str(Path(__file__).resolve()), "--child", row,
           "--device", args.device, "--epochs", str(args.epochs), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--recipe-epochs", str(args.recipe_epochs), "--raw", str(args.raw),
           "--stats", str(args.stats),
           *(["--recipe-file", str(args.recipe_file)] if args.recipe_file else [])]
    params = (None if row in ("reference", CONVOLUTIONS) or row.startswith("recipe:")
              else variant_params(row))
    if params is not None and params.nproc > 1:
        # torchrun's own --standalone launch; threads split as the train stage splits them
        cmd, env = distributed.plan_torchrun(params.nproc, torch.device(args.device), "auto",
                                             params.batch_size, params.compile, args.threads,
                                             os.environ, cmd)
    else:
        cmd, env = [sys.executable, *cmd], dict(os.environ)
    env.update(child_wait_policy(row, env))
    busy = busy_processes(load)
    try:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False, env=env)
    finally:
        stop(busy)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"train_speed: the {row!r} run failed (exit {done.returncode})")
    return json.loads(lines[-1].removeprefix(RESULT_MARK))


Row = tuple[str, int]  # (name, busy processes beside it)


def benchmark(args: argparse.Namespace, variants: list[str]) -> dict[Row, list[dict]]:
    """Every row `repeats` times, quiet and (the loaded ones) under load, alternating in ABBA
    order so that drifts hit all alike."""
    names = ["reference", *variants, *([CONVOLUTIONS] if args.convolutions else [])]
    rows: list[Row] = [(n, 0) for n in names]
    if args.load:
        rows += [(n, args.load) for n in names
                 if n in (args.loaded or names) and n != CONVOLUTIONS]
    runs: dict[Row, list[dict]] = {row: [] for row in rows}
    for repeat in range(args.repeats):
        for name, load in rows if repeat % 2 == 0 else rows[::-1]:
            run = run_child(args, name, load)
            runs[name, load].append(run)
            kernels = f", fused kernels {run['fused_kernels']}" if "fused_kernels" in run else ""
            loaded = f" beside {load} busy process(es)" if load else ""
            accuracy = ("" if run["test_accuracy"] is None
                        else f", accuracy {run['test_accuracy']:.4f}")
            print(f"[{repeat + 1}/{args.repeats}] {name}{loaded}: {run['seconds']:.2f} s, "
                  f"{run['images'] / run['seconds']:.0f} images/s{accuracy}, warm-up "
                  f"{run['warmup_seconds']:.1f} s{kernels}",
                  file=sys.stderr, flush=True)
    return runs


def median_ips(runs: list[dict]) -> float:
    return statistics.median(r["images"] / r["seconds"] for r in runs)


def summarise(name: str, runs: list[dict], reference_ips: float, load: int = 0,
              quiet_ips: float | None = None) -> dict[str, Any]:
    """One table row: medians over the repeats; seconds per whole epoch from the rate; for a
    loaded row also its slowdown, quiet over loaded images per second."""
    ips = median_ips(runs)
    loaded = {"load": load, "slowdown": quiet_ips / ips} if quiet_ips else {}
    return {
        "name": name, **loaded,
        "overrides": None if name in ("reference", CONVOLUTIONS) else parse_variant(name),
        "seconds_per_epoch": runs[0]["epoch_images"] / ips,
        "images_per_second": ips,
        "ratio": ips / reference_ips,
        "test_accuracy": None if runs[0]["test_accuracy"] is None else statistics.median(
            r["test_accuracy"] for r in runs),
        "warmup_seconds": statistics.median(r["warmup_seconds"] for r in runs),
        "cpu_share": statistics.median(r["cpu_share"] for r in runs),
        "runs": runs,
    }


def make_report(
    runs: dict[Row, list[dict]], recipe: list | None, args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    reference_ips = median_ips(runs["reference", 0])
    rows = [summarise(name, r, reference_ips) for (name, load), r in runs.items() if not load]
    loaded_rows = []
    if ("reference", args.load) in runs:
        loaded_reference = median_ips(runs["reference", args.load])
        loaded_rows = [summarise(name, r, loaded_reference, load, median_ips(runs[name, 0]))
                       for (name, load), r in runs.items() if load]
    accuracy_after = (f"{args.epochs} epoch(s) of {args.steps} steps" if args.steps
                      else f"{args.epochs} full epoch(s)")
    return {
        "machine": machine_info(device),
        "settings": {
            "device": args.device, "epochs": args.epochs, "steps": args.steps or None,
            "repeats": args.repeats, "warmup_steps": args.warmup, "batch_size": 100,
            "load": args.load,
            "recipe_file": None if args.recipe_file is None else str(args.recipe_file),
            "accuracy_after": accuracy_after,
            "command": " ".join(["bench/train_speed.py", *sys.argv[1:]]),
        },
        "rows": rows,
        "loaded_rows": loaded_rows,
        "speedup": rows[1]["ratio"],  # the first project variant (default unless named)
        "speedups": {row["name"]: row["ratio"] for row in rows[1:]
                     if row["name"] != CONVOLUTIONS},
        "recipe": recipe,
    }


def format_table(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    device = f"GPU {m['gpu']} (CUDA {m['cuda']}); " if "gpu" in m else ""
    steps = (f"{s['steps']} steps per epoch, extrapolated to a whole epoch" if s["steps"]
             else "whole epochs")
    lines = [
        f"machine: {device}{m['cpu']}, {m['cpu_count']} CPUs, {m['threads']} torch threads; "
        f"torch {m['torch']}, torchvision {m['torchvision']}",
        f"run: {s['epochs']} epoch(s), {steps}; median of {s['repeats']} alternating "
        f"repeat(s); test accuracy after {s['accuracy_after']}",
        f"{'row':<40}{'s/epoch':>9}{'images/s':>10}{'vs ref':>8}{'test acc':>10}"
        f"{'warm-up s':>11}{'CPU use':>9}",
    ]
    for row in report["rows"]:
        name = (row["name"] if row["name"] in ("reference", CONVOLUTIONS)
                else f"project {row['name']}")
        accuracy = "-" if row["test_accuracy"] is None else f"{row['test_accuracy']:.2%}"
        lines.append(
            f"{name:<40}{row['seconds_per_epoch']:>9.2f}{row['images_per_second']:>10.0f}"
            f"{row['ratio']:>7.2f}x{accuracy:>10}{row['warmup_seconds']:>11.1f}"
            f"{row['cpu_share']:>9.0%}")
    if report["loaded_rows"]:
        lines.append(f"beside {s['load']} busy process(es): {'':<18}{'s/epoch':>9}"
                     f"{'vs ref':>8}{'slowdown':>10}{'CPU use':>9}")
        for row in report["loaded_rows"]:
            name = row["name"] if row["name"] == "reference" else f"project {row['name']}"
            lines.append(f"{name:<40}{row['seconds_per_epoch']:>9.2f}{row['ratio']:>7.2f}x"
                         f"{row['slowdown']:>9.2f}x{row['cpu_share']:>9.0%}")
    for r in report["recipe"] or []:
        name = r["variant"]
        reached = (f"{r['target_accuracy']:.1%} at epoch {r['epoch_reached']}, after "
                   f"{r['seconds_to_target']:.1f} s" if r["epoch_reached"]
                   else f"{r['target_accuracy']:.1%} not reached")
        lines.append(f"recipe {name}: {r['epochs']} epochs in {r['train_seconds']:.1f} s of "
                     f"training (after warm-up), final {r['final_accuracy']:.2%}; {reached}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--epochs", type=int, default=1, help="epochs per timed run (default 1)")
    p.add_argument("--steps", type=int, default=0,
                   help="time only N steps per epoch, extrapolated to a whole epoch; the "
                        "accuracy is then measured after those steps (default 0: whole epochs)")
    p.add_argument("--repeats", type=int, default=1, help="alternating repeats; medians")
    p.add_argument("--variant", action="append",
                   help=f"a project row: tokens joined by '+', from {', '.join(TOKENS)} "
                        "(repeatable; default: default)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before each run")
    p.add_argument("--load", type=int, default=0,
                   help="also time rows beside N competing busy processes (default 0: quiet "
                        "only)")
    p.add_argument("--loaded", action="append",
                   help="a row to time under --load too: reference or a --variant "
                        "(repeatable; default: every row but --convolutions)")
    p.add_argument("--convolutions", action="store_true",
                   help="also time the default's oneDNN convolutions alone (CPU only; "
                        "forward, input and weight gradients; never under --load): the speed "
                        "that no fp32 change elsewhere in the step can pass")
    p.add_argument("--recipe", action=argparse.BooleanOptionalAction, default=None,
                   help="also train each variant's whole recipe: time to 99.5%% test accuracy "
                        "(default: on for cuda)")
    p.add_argument("--recipe-file", type=Path,
                   help="the recipe rows' train overrides: a YAML file like "
                        "recipes/best-single.yaml (default: the reference recipe)")
    p.add_argument("--recipe-epochs", type=int, default=0,
                   help="the recipe rows' epochs (default 0: the recipe's)")
    p.add_argument("--raw", type=Path, default=ROOT / "data" / "raw",
                   help="the MNIST IDX files, decompressed or .gz (default data/raw)")
    p.add_argument("--stats", type=Path, default=ROOT / "data" / "stats.json",
                   help="mean and std for the project path (computed from the data if absent)")
    p.add_argument("--json", type=Path, help="write the numbers here as JSON")
    p.add_argument("--child", help=argparse.SUPPRESS)  # one run, for the parent
    args = p.parse_args(argv)
    for variant in args.variant or []:
        try:
            parse_variant(variant)
        except ValueError as exc:
            p.error(str(exc))
    if min(args.epochs, args.repeats) < 1 or min(
            args.steps, args.warmup, args.load, args.recipe_epochs) < 0:
        p.error("--epochs and --repeats must be >= 1; --steps, --warmup, --load and "
                "--recipe-epochs >= 0")
    if args.recipe_file is not None and not args.child:
        try:  # a bad recipe stops the benchmark before any run
            for variant in args.variant or ["default"]:
                recipe_params(args, variant)
        except ImportError as exc:
            p.error(f"--recipe-file needs PyYAML ({exc})")
        except ParamsError as exc:
            p.error(str(exc))
    rows = ["reference", *(args.variant or ["default"])]
    for row in args.loaded or []:
        if row not in rows:
            p.error(f"--loaded {row}: not a row of this run ({', '.join(rows)})")
    if args.loaded and not args.load:
        p.error("--loaded needs --load N")
    if args.loaded and "reference" not in args.loaded:
        p.error("--loaded: include reference, the loaded rows' yardstick")
    if args.convolutions and not args.device.startswith("cpu"):
        p.error("--convolutions times oneDNN's CPU convolutions: only with --device cpu")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"train_speed: --device {args.device}: no CUDA GPU is available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = args.variant or ["default"]
    with tempfile.TemporaryDirectory(prefix="mnist-bench-") as scratch:
        args.raw = resolve_raw(args.raw, Path(scratch))
        runs = benchmark(args, variants)
        recipe = None
        if args.recipe if args.recipe is not None else device.type == "cuda":
            recipe = [{"variant": v, **run_child(args, f"recipe:{v}")} for v in variants]
    report = make_report(runs, recipe, args, device)
    print(format_table(report))
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
