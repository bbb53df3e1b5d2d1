"""bench/train_speed.py end to end on a tiny MNIST copy: it runs without PyYAML, MLflow or DVC
(as on a bare GPU host) and writes the table and the JSON it promises. Behaviour only: no test
here looks at a timing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mnist_pipeline.loop import to_tensor
from mnist_pipeline.params import TrainParams

from .conftest import ROOT, load_real, load_script, write_idx


@pytest.fixture(scope="module")
def bench():
    return load_script(ROOT / "bench" / "train_speed.py")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A mirror-like folder (.gz) with 400 training and 200 test images, and an environment
    in which `import yaml`, `import mlflow` and `import dvc` fail, in the script and its
    children."""
    base = tmp_path_factory.mktemp("bench")
    raw = base / "raw"
    raw.mkdir()
    for split, n in (("train", 400), ("t10k", 200)):
        images, labels = load_real(split, n)
        write_idx(raw / f"{split}-images-idx3-ubyte.gz", images, compress=True)
        write_idx(raw / f"{split}-labels-idx1-ubyte.gz", labels.astype(np.uint8), compress=True)
    blocker = base / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nsys.modules.update(yaml=None, mlflow=None, dvc=None)\n")
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    return raw, env


def run_bench(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "bench" / "train_speed.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def test_bench_writes_the_table_and_json_without_yaml_or_mlflow(tiny, tmp_path):
    raw, env = tiny
    blocked = subprocess.run([sys.executable, "-c", "import yaml"], env=env, capture_output=True)
    assert blocked.returncode != 0  # the environment really has no PyYAML
    out = tmp_path / "out.json"
    done = run_bench(env, "--device", "cpu", "--steps", "2", "--epochs", "1", "--warmup", "1",
                     "--threads", "1", "--variant", "fused+channels_last", "--raw", str(raw),
                     "--stats", str(tmp_path / "none.json"), "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["name"] for r in report["rows"]] == ["reference", "fused+channels_last"]
    for row in report["rows"]:
        assert row["seconds_per_epoch"] > 0 and row["images_per_second"] > 0
        assert 0 <= row["test_accuracy"] <= 1 and len(row["runs"]) == 1
        run = row["runs"][0]
        assert run["images"] == 200 and run["epoch_images"] == 400  # 2 steps of 100; 400
        assert run["flags"]["threads"] == 1
    assert report["rows"][1]["overrides"] == {"fused_optimizer": True, "channels_last": True}
    assert report["rows"][1]["runs"][0]["flags"]["deterministic"]  # the pipeline's setting
    assert report["speedup"] == report["rows"][1]["ratio"] > 0
    assert report["machine"]["threads"] == 1 and report["machine"]["cpu"]
    assert report["settings"]["accuracy_after"] == "1 epoch(s) of 2 steps"
    assert report["recipe"] is None  # only on CUDA unless --recipe
    assert "reference" in done.stdout and "project fused+channels_last" in done.stdout


def test_bench_data_parallel_row_runs_two_processes(tiny, tmp_path):
    """The ddp2 row: two ranks under torchrun, one result, the threads split between them."""
    raw, env = tiny
    out = tmp_path / "out.json"
    done = run_bench(env, "--device", "cpu", "--steps", "2", "--warmup", "1", "--threads", "2",
                     "--variant", "default", "--variant", "ddp2", "--raw", str(raw),
                     "--stats", str(tmp_path / "none.json"), "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    one, two = rows["default"]["runs"][0], rows["ddp2"]["runs"][0]
    assert (one["processes"], two["processes"]) == (1, 2)
    assert two["threads_per_process"] * 2 <= os.cpu_count()
    assert two["images"] == one["images"] == 200  # the same global batches
    assert 0 <= two["test_accuracy"] <= 1 and two["fused_kernels"] == one["fused_kernels"]


@pytest.fixture(scope="module")
def tensors():
    """200 real training images as tensors, the first 100 again as the test set."""
    images, labels = load_real("train", 200)
    x = to_tensor(images, 0.13, 0.31, torch.device("cpu"))
    y = torch.from_numpy(labels)
    return x, y, x[:100], y[:100]


def test_recipe_reports_accuracy_per_epoch_and_when_the_target_was_reached(bench, monkeypatch,
                                                                           tensors):
    params = dataclasses.replace(TrainParams(), batch_size=50, epochs=2)
    monkeypatch.setattr(bench, "TARGET_ACCURACY", 0.0)  # reached at once, whatever the numbers
    result = bench.run_recipe(params, tensors, torch.device("cpu"))
    assert result["epochs"] == 2 and len(result["accuracy_per_epoch"]) == 2
    assert result["epoch_reached"] == 1 and 0 < result["seconds_to_target"] <= result[
        "train_seconds"]
    assert result["final_accuracy"] == result["accuracy_per_epoch"][-1]


def test_recipe_scores_the_network_the_train_stage_registers(bench, monkeypatch, tensors):
    """With a weight average and test-time averaging (the default recipe's), each epoch's
    accuracy is the average's, over shifted copies, as the train stage would register it."""
    params = dataclasses.replace(TrainParams(), batch_size=50, ema_decay=0.9, tta=True,
                                 scheduler="onecycle", epochs=2)
    scored = []

    def validate(model, *args):
        scored.append((model, args[-1]))
        return real_validate(model, *args)

    real_validate, real_build_state = bench.validate, bench.build_state
    monkeypatch.setattr(bench, "validate", validate)
    built = []
    monkeypatch.setattr(bench, "build_state",
                        lambda *args, **kw: built.append(args) or real_build_state(*args, **kw))
    bench.run_recipe(params, tensors, torch.device("cpu"))
    assert built[0][2] == 4  # OneCycle's steps per epoch: 200 images in batches of 50
    assert len(scored) == 2
    for model, tta in scored:
        assert tta is True
        assert not any(p.requires_grad for p in model.parameters())  # the EMA copy


def test_recipe_rows_train_the_recipe_file(tiny, tmp_path):
    raw, env = tiny
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}  # a recipe file needs PyYAML
    recipe = tmp_path / "quick.yaml"
    recipe.write_text("train:\n  epochs: 2\n  scheduler: onecycle\n  ema_decay: 0.9\n")
    out = tmp_path / "out.json"
    done = run_bench(env, "--device", "cpu", "--steps", "2", "--warmup", "1", "--threads", "1",
                     "--variant", "default", "--recipe", "--recipe-file", str(recipe),
                     "--raw", str(raw), "--stats", str(tmp_path / "none.json"),
                     "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["settings"]["recipe_file"] == str(recipe)
    [row] = report["recipe"]
    assert row["epochs"] == 2 and len(row["accuracy_per_epoch"]) == 2  # the file's epochs
    assert "recipe default: 2 epochs" in done.stdout


def test_a_bad_recipe_file_stops_the_bench_before_any_run(tiny, tmp_path):
    raw, env = tiny
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train:\n  epochs: 0\n")
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    done = run_bench(env, "--device", "cpu", "--recipe", "--recipe-file", str(recipe),
                     "--raw", str(raw))
    assert done.returncode == 2
    assert "bad.yaml: params: train.epochs" in done.stderr and "Traceback" not in done.stderr
    assert "reference" not in done.stdout


def _busy_loops() -> list[int]:
    """PIDs of running processes whose command line is the benchmark's busy loop."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if b"while time.monotonic() < end: pass" in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
    return pids


def test_bench_times_the_loaded_rows_beside_busy_processes_and_stops_them(tiny, tmp_path):
    """--load 1: the named rows run again beside one busy process, which is running while
    they run and gone afterwards; loaded ratios are to the loaded reference."""
    raw, env = tiny
    env = {k: v for k, v in env.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = tmp_path / "out.json"
    done = run_bench(env, "--device", "cpu", "--steps", "2", "--warmup", "1", "--threads", "1",
                     "--variant", "default", "--variant", "unfused", "--variant", "longspin",
                     "--load", "1", "--loaded", "reference", "--loaded", "default",
                     "--loaded", "longspin", "--convolutions",
                     "--raw", str(raw), "--stats", str(tmp_path / "none.json"),
                     "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    names = ["reference", "default", "unfused", "longspin", "convolutions"]
    assert [r["name"] for r in report["rows"]] == names
    loaded = {r["name"]: r for r in report["loaded_rows"]}
    assert list(loaded) == ["reference", "default", "longspin"]
    assert report["settings"]["load"] == 1
    # the project's rows wait as the train stage makes them; longspin and the reference as
    # libgomp does by default, quiet and loaded
    for row in report["rows"] + report["loaded_rows"]:
        libgomp = row["name"] in ("reference", "longspin")
        assert {run["flags"]["openmp_wait"] for run in row["runs"]} == {
            "libgomp default" if libgomp else "GOMP_SPINCOUNT=1000"}, row["name"]
    quiet = {r["name"]: r for r in report["rows"]}
    for name, row in loaded.items():
        assert row["load"] == 1 and row["runs"][0]["images"] == 200
        assert row["slowdown"] == pytest.approx(
            quiet[name]["images_per_second"] / row["images_per_second"])
    assert loaded["reference"]["ratio"] == 1.0 and loaded["default"]["ratio"] > 0
    assert "beside 1 busy process(es)" in done.stdout
    assert not _busy_loops()
    # the convolutions alone: the same steps, timed, no model trained, quiet only
    alone = quiet["convolutions"]
    assert alone["runs"][0]["images"] == 200 and alone["images_per_second"] > 0
    assert alone["overrides"] is None and alone["test_accuracy"] is None
    convs = load_script(ROOT / "bench" / "convolutions.py")
    per_step = convs.convolution_flops(TrainParams(), torch.device("cpu"))
    assert alone["runs"][0]["flops"] == 2 * per_step  # 2 steps
    assert list(report["speedups"]) == ["default", "unfused", "longspin"]
    assert "\nconvolutions " in done.stdout


def test_convolutions_row_times_what_onednn_computes_in_the_default_step(monkeypatch):
    """bench/convolutions.py: the convolutions oneDNN computes (all three, or the second and
    third when the fused kernel computes the first), their arithmetic from the model's shapes,
    and one run computes each one's forward and the gradients the step computes (none for
    the image), in the step's memory format."""
    from mnist_pipeline import fused

    convs = load_script(ROOT / "bench" / "convolutions.py")
    cpu, params = torch.device("cpu"), TrainParams()
    first = 100 * 16 * 28 * 28 * 1 * 9  # 1 -> 16 channels, 3x3, at 28 x 28
    rest = 100 * (32 * 28 * 28 * 16 * 9 + 64 * 14 * 14 * 32 * 9)  # 16 -> 32; 32 -> 64 at 14
    fused_first = fused.status(params, cpu) == "on"
    calls = convs.onednn_convolutions(params, cpu)
    assert [c.input_shape[1] for c in calls] == ([16, 32] if fused_first else [1, 16, 32])
    assert sum(c.macs for c in calls) == rest + (0 if fused_first else first)
    # forward, input and weight gradients: 3 x the multiply-adds; the image's: 2 x
    assert convs.convolution_flops(params, cpu) == 2 * (3 * rest + (0 if fused_first else
                                                                    2 * first))
    eager = dataclasses.replace(params, fused_kernels=False)
    assert [c.input_grad for c in convs.onednn_convolutions(eager, cpu)] == [False, True, True]
    assert convs.convolution_flops(eager, cpu) == 2 * (2 * first + 3 * rest)

    work = convs.prepare(params, cpu)
    assert [w.x.requires_grad for w in work] == [c.input_grad for c in calls]
    assert all(t.is_contiguous(memory_format=torch.channels_last)
               for w in work for t in (w.call.conv.weight, w.x, w.grad))
    asked = []
    grad = torch.autograd.grad

    def spy(outputs, inputs, grad_outputs):
        asked.append(len(inputs))
        return grad(outputs, inputs, grad_outputs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    convs.run(convs.prepare(eager, cpu), 2)
    assert asked == [2, 3, 3] * 2  # (weight, bias) for the image's convolution


def test_busy_process_runs_until_stopped(bench):
    busy = bench.busy_processes(1)
    try:
        time.sleep(0.5)
        assert busy[0].poll() is None and busy[0].pid in _busy_loops()
    finally:
        bench.stop(busy)
    assert busy[0].returncode is not None and busy[0].pid not in _busy_loops()


@pytest.mark.parametrize("args, message", [
    (["--loaded", "default"], "--loaded needs --load N"),
    (["--load", "1", "--loaded", "bf16"], "--loaded bf16: not a row of this run"),
    (["--load", "1", "--loaded", "default"], "include reference"),
    (["--load", "-1"], "--load and --recipe-epochs >= 0"),
    (["--repeats", "0"], "--epochs and --repeats must be >= 1"),
    (["--device", "cuda", "--convolutions"], "only with --device cpu"),
])
def test_bench_rejects_inconsistent_options(bench, args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["fused+turbo", "bf32"])
def test_bench_rejects_an_unknown_variant_before_any_work(bench, variant, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--variant", variant])
    assert exit_info.value.code == 2 and "unknown variant token" in capsys.readouterr().err


def test_variant_tokens_combine_into_train_params(bench):
    params = bench.variant_params("fused+channels_last+bf16")
    assert (params.fused_optimizer, params.channels_last, params.amp) == (True, True, "bf16")
    assert bench.variant_params("default") == TrainParams()


def test_raw_folder_may_be_decompressed_or_gz_and_nothing_else(bench, tiny, tmp_path):
    raw, _ = tiny
    plain = bench.resolve_raw(raw, tmp_path)  # the .gz files, decompressed into tmp_path
    assert plain == tmp_path / "raw" and (plain / "t10k-labels-idx1-ubyte").stat().st_size == 208
    assert bench.resolve_raw(plain, tmp_path / "other") == plain  # used where it is
    with pytest.raises(SystemExit, match="neither the MNIST IDX files nor .gz"):
        bench.resolve_raw(tmp_path / "other", tmp_path)


def test_accuracy_bench_scores_each_seed_as_the_evaluate_stage_does(tmp_path):
    """bench/accuracy.py on 300 training and 200 test images: per-seed scores, their
    ensemble, and --reuse scoring the saved weights without training again."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for split, n in (("train", 300), ("t10k", 200)):
        images, labels = load_real(split, n)
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels.astype(np.uint8))
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "tiny.yaml").write_text("train:\n  epochs: 1\n  tta: false\n")
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"mean": 0.1307, "std": 0.3081}))
    out, result = tmp_path / "out", tmp_path / "accuracy.json"
    cmd = [sys.executable, str(ROOT / "bench" / "accuracy.py"), "--recipe", "tiny",
           "--seeds", "0", "1", "--threads", "1", "--device", "cpu", "--recipes", str(recipes),
           "--raw", str(raw), "--stats", str(stats), "--out", str(out), "--json", str(result)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    first = json.loads(result.read_text())
    (row,) = first["results"]
    assert row["recipe"] == "tiny" and row["epochs"] == 1
    assert [r["seed"] for r in row["runs"]] == [0, 1]
    accuracies = [r["test_accuracy"] for r in row["runs"]]
    assert all(0.1 < a <= 1 and abs(a * 200 - round(a * 200)) < 1e-9 for a in accuracies)
    assert row["mean"] == pytest.approx(sum(accuracies) / 2) and row["ensemble"] is not None
    assert "Epoch: 1" in done.stdout

    weights = out / "tiny-seed0" / "model.pt"
    saved = weights.stat().st_mtime_ns
    again = subprocess.run([*cmd, "--reuse"], capture_output=True, text=True, timeout=600,
                           cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Epoch:" not in again.stdout and weights.stat().st_mtime_ns == saved
    assert json.loads(result.read_text())["results"] == first["results"]


def test_step_profile_groups_the_step_and_measures_the_peak(tmp_path):
    """bench/step_profile.py: every operator's time lands in one group (shares sum to 1),
    the convolutions are the oneDNN ones, and the CPU's multiply-add peak is measured."""
    profile = load_script(ROOT / "bench" / "step_profile.py")
    assert profile.group_of("aten::convolution_backward") == "convolution (oneDNN)"
    assert profile.group_of("_BnPoolReluBackward") == "fused kernels"
    assert profile.group_of("aten::nll_loss_backward") == profile.OTHER

    out = tmp_path / "profile.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "step_profile.py"), "--steps",
                           "2", "--warmup", "1", "--rounds", "2", "--threads", "1", "--json",
                           str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    shares = {g["name"]: g["share"] for g in result["groups"]}
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["convolution (oneDNN)"] > 0 and shares["linear layers"] > 0
    assert result["conv_gflops"] > 0 and result["matmul_gflops"] > 0
    assert result["fma_peak_gflops"] > 0 and result["rounds"] == 2
    assert result["machine"]["threads"] == 1 and result["steps"] == 2
    assert "oneDNN convolutions:" in done.stdout


def test_a_recipe_file_with_a_validation_split_is_refused(bench, tmp_path):
    recipe = tmp_path / "held-out.yaml"
    recipe.write_text("train:\n  val_size: 5000\n")
    args = argparse.Namespace(recipe_file=recipe, recipe_epochs=0)
    with pytest.raises(bench.ParamsError, match="no validation split"):
        bench.recipe_params(args, "default")
    recipe.write_text("train:\n  epochs: 3\n  train_subset: 600\n")
    with pytest.raises(bench.ParamsError, match="train.train_subset 0"):
        bench.recipe_params(args, "default")
    args.recipe_file = ROOT / "recipes" / "best-single.yaml"
    assert bench.recipe_params(args, "bf16").amp == "bf16"  # the variant on top of the recipe
