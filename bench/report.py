"""Write bench/RESULTS.md from the committed result files in bench/results/.

    python bench/report.py > bench/RESULTS.md

Inputs (each written by the command named in its section, numbers only):
  bench/results/speed.json     `make bench`    (bench/train_speed.py --json ...)
  bench/results/ddp.json       `make bench-ddp` (the same, one process against two)
  bench/results/accuracy.json  `make accuracy` (bench/accuracy.py)
  bench/results/source.json    what the blog post the reference recipe comes from reports
A result file that is absent leaves its section out. tests/test_layout.py checks that the
committed RESULTS.md is exactly what this script prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

# What each project row of `make bench` adds to the row before it (the speed ladder).
LADDER = [
    ("plain", "reference",
     "the project's loop itself: the dataset as one tensor in memory, batches by index instead "
     "of a DataLoader of per-image ToTensor/Normalize, freed memory kept in the heap instead "
     "of page-faulted back each step (`runtime.tune_cpu_allocator`), no NaN fill of new "
     "tensors in deterministic mode, ReLU after (not before) each max-pool"),
    ("plain+channels_last", "plain", "channels-last (NHWC) memory layout (`train.channels_last`)"),
    ("unfused", "plain+channels_last", "fused Adam instead of its for-loop "
     "(`train.fused_optimizer`)"),
    ("default", "unfused", "the fused BatchNorm+ReLU(+max-pool) CPU kernels, and the first "
     "convolution fused with its BatchNorm (`train.fused_kernels`, "
     "`src/mnist_pipeline/csrc/fused_bn.cpp`)"),
]
ROW_NAMES = {
    "reference": "reference loop (bench/reference.py)",
    "default": "project default",
    "unfused": "project, eager modules (`fused_kernels: false`)",
    "plain+channels_last": "project, eager modules and for-loop Adam",
    "plain": "project plain (NCHW, for-loop Adam, eager modules)",
    "ddp2": "project default, 2 processes (`train.nproc: 2`)",
}


def load(name: str, folder: Path) -> dict[str, Any] | None:
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else None


def pct(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}%}"


def machine_line(m: dict[str, Any]) -> str:
    parts = [f"{m['cpu']}, {m['cpu_count']} CPUs" if "cpu_count" in m else m["cpu"]]
    if m.get("gpu"):
        parts.append(f"GPU {m['gpu']} (CUDA {m['cuda']})")
    parts.append(f"{m['threads']} torch thread(s)" if m.get("threads") else "torch's threads")
    parts.append(f"torch {m['torch']}")
    if "torchvision" in m:
        parts.append(f"torchvision {m['torchvision']}")
    if "python" in m:
        parts.append(f"Python {m['python']}")
    return "; ".join(parts)


def speed_section(speed: dict[str, Any]) -> list[str]:
    s, rows = speed["settings"], {r["name"]: r for r in speed["rows"]}
    device = "GPU" if speed["machine"].get("gpu") else "CPU"
    lines = [
        f"## Training speed ({device})",
        "",
        "The reference loop as the blog post publishes it (`bench/reference.py`: torchvision "
        "MNIST with `ToTensor` + `Normalize`, `DataLoader(batch_size=100, shuffle=True)`, the "
        "same CNN, Adam, ReduceLROnPlateau) against the project's training loop "
        "(`mnist_pipeline.loop.fit`) with the reference recipe (`TrainParams`' field "
        "defaults: the same schedule, batch size and fp32 arithmetic), in the variants below. "
        "Every timed run is a fresh process that first takes a few untimed warm-up steps; "
        "runs alternate (reference, A, B, ... then back), and the table gives medians. "
        "\"CPU use\" is CPU seconds per wall second and thread during the run. Speed is "
        "reported as a ratio to the reference measured in the same invocation: the machine's "
        "own speed drifts between invocations.",
        "",
        f"- Machine: {machine_line(speed['machine'])}",
        f"- Runs: {s['epochs']} epoch(s) of "
        + (f"{s['steps']} steps, extrapolated to a whole epoch" if s["steps"] else "60,000 images")
        + f", {s['repeats']} alternating repeat(s), batch {s['batch_size']}",
        f"- Command: `make bench` (`python {s['command']}`)",
        "",
        "| row | s/epoch | images/s | vs reference | test accuracy after the run | CPU use |",
        "|-----|--------:|---------:|-------------:|----------------------------:|--------:|",
    ]
    for name, r in rows.items():
        lines.append(f"| {ROW_NAMES.get(name, 'project ' + name)} | "
                     f"{r['seconds_per_epoch']:.2f} | {r['images_per_second']:.0f} | "
                     f"{r['ratio']:.2f}x | {pct(r['test_accuracy'])} | {r['cpu_share']:.0%} |")
    lines += ["", "Seconds of each timed run, in the order run:", ""]
    for name, r in rows.items():
        lines.append(f"- {name}: " + ", ".join(f"{run['seconds']:.2f}" for run in r["runs"]))
    ladder = [(n, b, what) for n, b, what in LADDER if n in rows and b in rows]
    if ladder:
        lines += ["", "### What each speed idea bought", "",
                  "Each step adds one idea to the row before it (the ratio of their "
                  "median images per second, same invocation):", ""]
        for name, before, what in ladder:
            gain = rows[name]["images_per_second"] / rows[before]["images_per_second"]
            lines.append(f"- {gain:.2f}x: {what} (`{before}` -> `{name}`)")
    return lines


def ddp_section(ddp: dict[str, Any]) -> list[str]:
    """One process with all the threads against several processes (torchrun, DDP)."""
    s, rows = ddp["settings"], {r["name"]: r for r in ddp["rows"]}
    one, many = rows["default"], rows["ddp2"]
    lines = [
        "## Data-parallel training (CPU)",
        "",
        "The train stage's loop in one process with every thread against the same loop in "
        "two processes under `torchrun --standalone` (`train.nproc: 2`: gloo, "
        "DistributedDataParallel, 50 images per process and step, the cores split between "
        "them), with the reference loop for scale. Same method as the speed table: fresh "
        "processes, alternating runs, medians.",
        "",
        f"- Machine: {machine_line(ddp['machine'])}",
        f"- Runs: {s['epochs']} epoch(s) of "
        + (f"{s['steps']} steps, extrapolated to a whole epoch" if s["steps"] else "60,000 images")
        + f", {s['repeats']} alternating repeat(s), batch {s['batch_size']} over all processes",
        f"- Command: `make bench-ddp` (`python {s['command']}`)",
        "",
        "| row | processes x threads | s/epoch | images/s | vs reference |",
        "|-----|--------------------:|--------:|---------:|-------------:|",
    ]
    for name, r in rows.items():
        shape = ("-" if name == "reference" else
                 f"{r['runs'][0]['processes']} x {r['runs'][0]['threads_per_process']}")
        lines.append(f"| {ROW_NAMES.get(name, 'project ' + name)} | {shape} | "
                     f"{r['seconds_per_epoch']:.2f} | {r['images_per_second']:.0f} | "
                     f"{r['ratio']:.2f}x |")
    gain = many["images_per_second"] / one["images_per_second"]
    lines += ["", f"Two processes train at {gain:.2f}x the speed of one on this machine: "
              "with as many cores as processes, data parallelism only splits the same cores "
              "and adds a gradient all-reduce per step. It pays with a GPU or more cores per "
              "process."]
    return lines


def accuracy_table(accuracy: dict[str, Any]) -> list[str]:
    """The accuracy table, also quoted in README.md."""
    lines = ["| recipe | epochs | seeds | test accuracy per seed | mean | ensemble of the seeds "
             "| training time per seed |",
             "|--------|-------:|------:|------------------------|-----:|--------------------:"
             "|-----------------------:|"]
    for r in accuracy["results"]:
        seeds = ", ".join(f"{pct(run['test_accuracy'])} (seed {run['seed']})"
                          for run in r["runs"])
        ensemble = pct(r["ensemble"]) if r["ensemble"] is not None else "-"
        lines.append(f"| {r['recipe']} | {r['epochs']} | {len(r['runs'])} | {seeds} | "
                     f"{pct(r['mean'])} | {ensemble} | {r['train_seconds'] / 60:.0f} min |")
    return lines


def accuracy_section(accuracy: dict[str, Any], source: dict[str, Any] | None) -> list[str]:
    lines = [
        "## Test accuracy",
        "",
        "Each recipe in `recipes/` trained with the train stage's own code on all 60,000 "
        "training images, per seed, and scored on the 10,000 test images by the evaluate "
        "stage's own function (`evaluate_stage.score_test_set`) as the model the train stage "
        "registers (test-time averaging included where the recipe has it). The ensemble "
        "averages the probabilities of a recipe's seeds. Training time is wall-clock time of "
        "the train stage's loop on the machine below.",
        "",
        f"- Machine: {machine_line(accuracy['machine'])}",
        f"- Command: `{accuracy['command']}` (`make accuracy` runs three seeds)",
        "",
        *accuracy_table(accuracy),
    ]
    if source:
        lines += ["", f"The blog post reports {pct(source['test_accuracy'])} for the reference "
                  f"recipe from {source['runs']} run; {source['note']}"]
    return lines


def report(folder: Path = RESULTS) -> str:
    speed, accuracy = load("speed.json", folder), load("accuracy.json", folder)
    source, ddp = load("source.json", folder), load("ddp.json", folder)
    lines = [
        "# Benchmark results",
        "",
        "<!-- Generated by `python bench/report.py > bench/RESULTS.md` from bench/results/"
        "*.json: edit those or the script, not this file. -->",
        "",
        "What the project measures, on which machine, and the command that measures each "
        "number again. Commands run from the repository root after `make install` and "
        "`make repro` (or `dvc repro compute-stats`, for `data/raw` and `data/stats.json`).",
    ]
    if accuracy:
        lines += ["", *accuracy_section(accuracy, source)]
    if speed:
        lines += ["", *speed_section(speed)]
    if ddp:
        lines += ["", *ddp_section(ddp)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    sys.stdout.write(report(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
