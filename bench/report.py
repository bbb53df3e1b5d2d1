"""Write bench/RESULTS.md from the committed result files in bench/results/.

    python bench/report.py --readme README.md > bench/RESULTS.md   (`make report`)

Inputs (each written by the command named in its section, numbers only):
  bench/results/speed.json     `make bench`    (bench/train_speed.py --json ...)
  bench/results/profile.json   `make bench`    (bench/step_profile.py --json ...)
  bench/results/ddp.json       `make bench-ddp` (the same, one process against two)
  bench/results/cuda.json      `make bench-gpu` (the same on a CUDA GPU, with time to 99.5%)
  bench/results/accuracy.json  `make accuracy` (bench/accuracy.py)
  bench/results/bf16.json      `make accuracy-bf16` (bench/accuracy.py, fp32 against bf16)
  bench/results/source.json    what the blog post the reference recipe comes from reports
A result file that is absent leaves its section out. With --readme, the accuracy table quoted
in that file is replaced by this one. tests/test_layout.py checks that the committed
RESULTS.md is exactly what this script prints, and README.md's table this one.
"""

from __future__ import annotations

import argparse
import json
import statistics
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
    "bf16": "project, bf16 autocast (`amp: bf16`)",
    "compile": "project, `torch.compile` (`compile: true`)",
    "convolutions": "the default's oneDNN convolutions alone (no training)",
    "longspin": "project default, libgomp's long OpenMP spin (no `GOMP_SPINCOUNT`)",
}
# A bf16 recipe is offered only when it is this much faster than the reference loop and its
# mean test accuracy is this close to fp32's (points of accuracy, as a fraction).
BF16_MIN_SPEEDUP, BF16_MAX_LOSS = 4.0, 0.0005


def row_name(name: str) -> str:
    return ROW_NAMES.get(name, f"project {name}")


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


def speed_section(speed: dict[str, Any], target: str = "make bench") -> list[str]:
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
        f"- Command: `{target}` (`python {s['command']}`)",
        "",
        "| row | s/epoch | images/s | vs reference | test accuracy after the run | CPU use |",
        "|-----|--------:|---------:|-------------:|----------------------------:|--------:|",
    ]
    for name, r in rows.items():
        accuracy = "-" if r["test_accuracy"] is None else pct(r["test_accuracy"])
        lines.append(f"| {row_name(name)} | "
                     f"{r['seconds_per_epoch']:.2f} | {r['images_per_second']:.0f} | "
                     f"{r['ratio']:.2f}x | {accuracy} | {r['cpu_share']:.0%} |")
    lines += ["", "Seconds of each timed run, in the order run:", ""]
    for name, r in rows.items():
        lines.append(f"- {name}: " + ", ".join(f"{run['seconds']:.2f}" for run in r["runs"]))
    if "compile" in rows and "default" in rows:
        compiled, default = rows["compile"], rows["default"]
        lines += ["", "`torch.compile` stays off by default: here it trains at "
                  f"{compiled['images_per_second'] / default['images_per_second']:.2f}x the "
                  f"default's speed, after {compiled['warmup_seconds']:.0f} s of warm-up steps "
                  "(compilation included) in every new process. Its graphs call the same "
                  "oneDNN convolutions, the largest part of the step (below), and it fuses the "
                  "BatchNorm/ReLU/max-pool work that the fused kernels already fuse (they are "
                  "off under `compile`); it also changes the arithmetic."]
    ladder = [(n, b, what) for n, b, what in LADDER if n in rows and b in rows]
    if ladder:
        lines += ["", "### What each speed idea bought", "",
                  "Each step adds one idea to the row before it (the ratio of their "
                  "median images per second, same invocation):", ""]
        for name, before, what in ladder:
            gain = rows[name]["images_per_second"] / rows[before]["images_per_second"]
            lines.append(f"- {gain:.2f}x: {what} (`{before}` -> `{name}`)")
    return lines


def recipe_section(speed: dict[str, Any]) -> list[str]:
    """The whole recipe per variant (`--recipe`): when it reached the target accuracy."""
    s = speed["settings"]
    recipe = f"`{s['recipe_file']}`" if s.get("recipe_file") else "the reference recipe"
    target = speed["recipe"][0]["target_accuracy"]
    images = (f"a fixed {s['steps'] * s['batch_size']:,} of the training images" if s["steps"]
              else "all 60,000 training images")
    lines = ["### Time to " + pct(target, 1), "",
             f"Each variant trains {recipe} on {images}, once, after the "
             "timed rows. After each epoch (untimed) it scores the network that the train "
             "stage would register on the 10,000 test images (the weight average and the "
             "shifted copies, where the recipe has them). Time is training time only.", "",
             "| variant | epochs | reached " + pct(target, 1) + " | after | final test "
             "accuracy | training time |",
             "|---------|-------:|--------:|------:|----------:|------:|"]
    for r in speed["recipe"]:
        reached = (f"epoch {r['epoch_reached']}", f"{r['seconds_to_target']:.1f} s") if r[
            "epoch_reached"] else ("not reached", "-")
        lines.append(f"| {row_name(r['variant'])} | {r['epochs']} | {reached[0]} | "
                     f"{reached[1]} | {pct(r['final_accuracy'])} | "
                     f"{r['train_seconds']:.1f} s |")
    return lines


def gpu_section(cuda: dict[str, Any] | None) -> list[str]:
    """`make bench-gpu`'s result, or how to get one."""
    if cuda is None:
        return ["## Training speed (GPU)", "",
                "No GPU result is committed. On a machine with a CUDA GPU, `make bench-gpu` "
                "times the default and bf16 rows against the reference loop and trains the "
                "default recipe (`recipes/best-single.yaml`) to 99.5% in each; it writes "
                "`bench/results/cuda.json`, and `make report` then shows it here."]
    lines = speed_section(cuda, "make bench-gpu")
    return [*lines, "", *recipe_section(cuda)] if cuda.get("recipe") else lines


def wait_setting(speed: dict[str, Any]) -> str:
    """'`GOMP_SPINCOUNT=N`, ' as the default row's runs recorded it, else nothing."""
    waits = {run.get("flags", {}).get("openmp_wait") for r in speed["loaded_rows"]
             if r["name"] == "default" for run in r["runs"]}
    return f"`{waits.pop()}`, " if len(waits) == 1 and None not in waits else ""


def loaded_section(speed: dict[str, Any]) -> list[str]:
    """The rows again beside competing busy processes, from the same invocation."""
    quiet = {r["name"]: r for r in speed["rows"]}
    load = speed["settings"]["load"]
    lines = [
        "### Beside a busy process",
        "",
        f"The same invocation timed these rows again beside {load} competing process(es), "
        "each spinning on one core (a bounded `python -c` busy loop that the benchmark starts "
        "just before the run and kills just after it), as when another job shares the "
        "machine. Slowdown is the loaded time over the quiet time; the ratio is to the "
        "reference under the same load. The project's rows wait at OpenMP barriers as the "
        f"train stage makes them ({wait_setting(speed)}the run's `openmp_wait` tag): with "
        "libgomp's default long spin, a waiting thread holds the core that the thread it "
        "waits for needs.",
        "",
        "| row | quiet s/epoch | loaded s/epoch | slowdown | vs reference under load | CPU use |",
        "|-----|--------------:|---------------:|---------:|------------------------:|--------:|",
    ]
    for r in speed["loaded_rows"]:
        lines.append(f"| {row_name(r['name'])} | "
                     f"{quiet[r['name']]['seconds_per_epoch']:.2f} | "
                     f"{r['seconds_per_epoch']:.2f} | {r['slowdown']:.2f}x | "
                     f"{r['ratio']:.2f}x | {r['cpu_share']:.0%} |")
    lines += ["", "Seconds of each loaded run, in the order run:", ""]
    for r in speed["loaded_rows"]:
        lines.append(f"- {r['name']}: " + ", ".join(f"{run['seconds']:.2f}" for run in r["runs"]))
    return lines + spin_tradeoff(quiet, {r["name"]: r for r in speed["loaded_rows"]})


def spin_tradeoff(quiet: dict[str, Any], loaded: dict[str, Any]) -> list[str]:
    """What the train stage's short OpenMP spin costs on the quiet machine and saves under
    load: the default row against the `longspin` row, both measured quiet and loaded."""
    if not all(name in rows for name in ("default", "longspin") for rows in (quiet, loaded)):
        return []
    quiet_gain = quiet["default"]["images_per_second"] / quiet["longspin"]["images_per_second"]
    loaded_gain = (loaded["default"]["images_per_second"]
                   / loaded["longspin"]["images_per_second"])
    return ["", f"The short spin against libgomp's long one (`longspin`): quiet, the default "
            f"trains at {quiet_gain:.2f}x the long spin's speed; beside the busy process, at "
            f"{loaded_gain:.2f}x (the long spin slows {loaded['longspin']['slowdown']:.2f}x "
            f"under load, the short one {loaded['default']['slowdown']:.2f}x)."]


def convolution_rate(profile: dict[str, Any], alone: dict[str, Any] | None) -> str:
    """The oneDNN convolutions' rate (unprofiled, from the speed table's `convolutions` row
    when there is one) against the CPU's fp32 peak and a matrix multiply."""
    if alone:
        gflops = statistics.median(run["flops"] / run["seconds"] for run in alone["runs"]) / 1e9
        text = ("Timed alone (the speed table's `convolutions` row), the oneDNN convolutions "
                f"run at {gflops:.0f} GFLOP/s")
    else:
        gflops = profile["conv_gflops"]
        text = f"The oneDNN convolutions run at {gflops:.0f} GFLOP/s under the profiler"
    peak = profile["fma_peak_gflops"]
    if not peak:  # no C compiler for the peak's loop
        return (text + f", {gflops / profile['matmul_gflops']:.0%} of the "
                f"{profile['matmul_gflops']:.0f} GFLOP/s of a 2048 x 2048 matrix multiply.")
    return (text + f", {gflops / peak:.0%} of this CPU's fp32 multiply-add peak ({peak:.0f} "
            "GFLOP/s: independent vector multiply-adds in registers); a 2048 x 2048 matrix "
            f"multiply reaches {profile['matmul_gflops']:.0f} GFLOP/s.")


def convolution_bound(default: dict[str, Any], alone: dict[str, Any] | None,
                      conv_share: float) -> str:
    """The default's speed if nothing but its convolutions took time."""
    if alone:
        return (f" They take {alone['seconds_per_epoch']:.2f} s per epoch alone (forward, input "
                "and weight gradients on random data, nothing else; same invocation as the "
                f"default row), {alone['seconds_per_epoch'] / default['seconds_per_epoch']:.0%}"
                f" of the default's {default['seconds_per_epoch']:.2f} s: even if everything "
                "else in the step took no time at all, the default would train at about "
                f"{alone['ratio']:.2f}x the reference (it trains at {default['ratio']:.2f}x).")
    return (" If everything else in the step took no time at all, the default would train at "
            f"about {default['ratio'] / conv_share:.2f}x the reference (its "
            f"{default['ratio']:.2f}x above over the convolutions' {conv_share:.0%}).")


def profile_section(profile: dict[str, Any], speed: dict[str, Any] | None) -> list[str]:
    """Where the default's step goes, and the speed that its convolutions leave it at most."""
    conv = next(g for g in profile["groups"] if g["name"] == "convolution (oneDNN)")
    steps = profile["steps"]
    rows = {r["name"]: r for r in speed["rows"]} if speed else {}
    alone = rows.get("convolutions")
    lines = [
        "### Where the default's time goes",
        "",
        "Self CPU time of each operator under `torch.profiler`, grouped, for "
        f"{steps} steps of the default row's training (fused kernels "
        f"{profile['fused_kernels']}), the fastest of {profile['rounds']} rounds on fresh "
        "models, and this CPU's fp32 peak on the same threads, against which the rate of the "
        "convolutions that oneDNN computes (the second and third: forward, input and weight "
        "gradients) is read.",
        "",
        f"- Machine: {machine_line(profile['machine'])}",
        f"- Command: `make bench` (`{profile['command']}`)",
        "",
        "| part of the step | seconds | share |",
        "|------------------|--------:|------:|",
        *(f"| {g['name']} | {g['seconds']:.3f} | {g['share']:.0%} |" for g in profile["groups"]),
        "",
        f"The profiler slows the step: its fastest round took "
        f"{profile['wall_seconds'] / steps * 1000:.1f} ms per step, the same steps unprofiled "
        f"{profile['unprofiled_wall_seconds'] / steps * 1000:.1f} ms. The shares are of "
        "profiled time" + ("; the rate and the bound below come from unprofiled runs."
                           if alone else "."),
        "",
        convolution_rate(profile, alone),
    ]
    if "default" in rows:
        lines[-1] += convolution_bound(rows["default"], alone, conv["share"])
        lines[-1] += (
            " In fp32, what is left to gain outside the convolutions is at most the gap between "
            "the default and that bound (the fused kernels' share first); inside them, the gap "
            "between their rate and the peak, or fewer multiplications (Winograd; PyTorch's "
            "`mkldnn_convolution` asks oneDNN for direct convolutions). bf16 halves the bytes "
            "instead.")
    return lines


def bf16_section(bf16: dict[str, Any], speed: dict[str, Any] | None) -> list[str]:
    """bf16 autocast against fp32: accuracy over seeds, speed, and whether it is offered."""
    fp32 = next(r for r in bf16["results"] if not r.get("overrides"))
    half = next(r for r in bf16["results"] if r.get("overrides", {}).get("amp") == "bf16")
    lines = [
        "## bf16 autocast",
        "",
        "`amp: bf16` runs the convolutions and linear layers in bfloat16 under autocast "
        "(the fused kernels, fp32 only, are off). It changes the arithmetic, so it is never "
        "the default; the project offers it as a named recipe only if it trains at least "
        f"{BF16_MIN_SPEEDUP:.0f}x as fast as the reference loop and its mean test accuracy "
        f"is within {BF16_MAX_LOSS:.2%} of fp32's. The default recipe (`best-single`) with "
        "and without it, per seed:",
        "",
        f"- Machine: {machine_line(bf16['machine'])}",
        f"- Command: `{bf16['command']}` (`make accuracy-bf16` runs the same recipes and "
        "seeds)",
        "",
        *accuracy_table(bf16),
    ]
    rows = {r["name"]: r for r in speed["rows"]} if speed else {}
    if speed and "cpu_bf16" in speed["machine"]:
        flags = speed["machine"]["cpu_bf16"]
        amx = any(f.startswith("amx") for f in flags)
        found = ", ".join(flags) or "no bf16 instructions"
        lines += ["", f"The CPU of the speed table has {found}"
                  + ("" if amx else " and no AMX") + " (`/proc/cpuinfo`); oneDNN runs bf16 "
                  "convolutions with what it finds."]
    loss = fp32["mean"] - half["mean"]
    verdict = [f"its mean accuracy is {abs(loss):.2%} {'below' if loss > 0 else 'above'} "
               "fp32's"]
    offered = loss <= BF16_MAX_LOSS
    if "bf16" in rows:
        verdict.insert(0, f"it trains at {rows['bf16']['ratio']:.2f}x the reference loop "
                       "(the speed table above)")
        offered = offered and rows["bf16"]["ratio"] >= BF16_MIN_SPEEDUP
    # (each table names its own machine: the speed and the seeds may come from different ones)
    said = " and ".join(verdict)
    lines += ["", f"{said[0].upper()}{said[1:]}: "
              + ("offered as `recipes/bf16.yaml`." if offered else
                 "not offered as a recipe; `amp` stays `none`. "
                 "`dvc exp run -S train.amp=bf16` tries it.")]
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
        lines.append(f"| {row_name(name)} | {shape} | "
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
    profile, bf16 = load("profile.json", folder), load("bf16.json", folder)
    cuda = load("cuda.json", folder)
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
        if speed.get("loaded_rows"):
            lines += ["", *loaded_section(speed)]
    if profile:
        lines += ["", *profile_section(profile, speed)]
    if bf16:
        lines += ["", *bf16_section(bf16, speed)]
    if ddp:
        lines += ["", *ddp_section(ddp)]
    lines += ["", *gpu_section(cuda)]
    return "\n".join(lines) + "\n"


def with_accuracy_table(text: str, table: list[str]) -> str:
    """`text` (a Markdown file) with its accuracy table, from the header row to the first line
    after it that is not a table row, replaced by `table`."""
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if line == table[0]]
    if len(starts) != 1:
        raise ValueError(f"expected one accuracy table (header row {table[0]!r}), found "
                         f"{len(starts)}")
    end = starts[0]
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join([*lines[:starts[0]], *table, *lines[end:]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--readme", type=Path,
                        help="a Markdown file whose accuracy table to replace (README.md)")
    args = parser.parse_args(argv)
    sys.stdout.write(report(args.results))
    accuracy = load("accuracy.json", args.results) if args.readme is not None else None
    if accuracy:
        from mnist_pipeline.io import write_text  # whole or not at all

        try:
            updated = with_accuracy_table(args.readme.read_text(), accuracy_table(accuracy))
        except (OSError, ValueError) as exc:
            print(f"error: {args.readme}: {exc}", file=sys.stderr)
            return 1
        write_text(args.readme, updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
