"""bench/report.py on made-up result files: the loaded rows, the step profile and the bf16
verdict come out of the numbers they are given (tests/test_layout.py checks the committed
RESULTS.md against the committed files)."""

from __future__ import annotations

import json

import pytest

from .conftest import ROOT, load_script

MACHINE = {"cpu": "Test CPU", "cpu_count": 2, "threads": 2, "torch": "2.x"}


@pytest.fixture(scope="module")
def report():
    return load_script(ROOT / "bench" / "report.py")


def _row(name: str, ips: float, ratio: float, **extra) -> dict:
    runs = [{"seconds": 15000 / ips, "images": 15000, "epoch_images": 60000}]
    return {"name": name, "seconds_per_epoch": 60000 / ips, "images_per_second": ips,
            "ratio": ratio, "test_accuracy": 0.98, "warmup_seconds": 2.0, "cpu_share": 0.9,
            "runs": runs, **extra}


def _speed(bf16_ratio: float) -> dict:
    return {
        "machine": {**MACHINE, "cpu_bf16": ["avx512_bf16"]},
        "settings": {"epochs": 1, "steps": 150, "repeats": 1, "batch_size": 100, "load": 1,
                     "command": "bench/train_speed.py --load 1"},
        "rows": [_row("reference", 1000, 1.0), _row("default", 2500, 2.5),
                 _row("bf16", 1000 * bf16_ratio, bf16_ratio),
                 _row("compile", 2000, 2.0, warmup_seconds=41.0)],
        "loaded_rows": [_row("reference", 400, 1.0, load=1, slowdown=2.5),
                        _row("default", 1250, 3.125, load=1, slowdown=2.0)],
    }


def _accuracy(name: str, overrides: dict, accuracies: list[float]) -> dict:
    mean = sum(accuracies) / len(accuracies)
    return {"recipe": name, "name": "best-single", "overrides": overrides, "epochs": 17,
            "runs": [{"seed": i, "test_accuracy": a, "train_seconds": 600.0}
                     for i, a in enumerate(accuracies)],
            "train_seconds": 600.0, "mean": mean, "ensemble": 0.998}


def _write(folder, speed: dict, fp32: list[float], bf16: list[float], **profile_extra) -> None:
    profile = {"machine": MACHINE, "command": "python bench/step_profile.py", "steps": 60,
               "fused_kernels": "on", "conv_gflops": 150.0, "matmul_gflops": 200.0,
               "rounds": 3, "wall_seconds": 3.0, "unprofiled_wall_seconds": 2.4,
               "fma_peak_gflops": None, **profile_extra,
               "groups": [{"name": "convolution (oneDNN)", "seconds": 1.0, "share": 0.625},
                          {"name": "fused kernels", "seconds": 0.6, "share": 0.375}]}
    accuracy = {"machine": MACHINE, "command": "python bench/accuracy.py",
                "results": [_accuracy("best-single", {}, fp32),
                            _accuracy("best-single:amp=bf16", {"amp": "bf16"}, bf16)]}
    for name, data in (("speed.json", speed), ("profile.json", profile),
                       ("bf16.json", accuracy)):
        (folder / name).write_text(json.dumps(data))


def test_loaded_rows_show_quiet_and_loaded_times_slowdown_and_loaded_ratio(report, tmp_path):
    _write(tmp_path, _speed(3.0), [0.997, 0.997], [0.997, 0.997])
    text = report.report(tmp_path)
    assert "### Beside a busy process" in text and "beside 1 competing process(es)" in text
    assert "| project default | 24.00 | 48.00 | 2.00x | 3.12x | 90% |" in text
    assert "| reference loop (bench/reference.py) | 60.00 | 150.00 | 2.50x | 1.00x | 90% |" in text
    assert "here it trains at 0.80x the default's speed, after 41 s of warm-up steps" in text


def test_loaded_section_names_the_wait_that_the_default_runs_recorded(report, tmp_path):
    speed = _speed(3.0)  # runs without flags (older result files): no setting named
    _write(tmp_path, speed, [0.997], [0.997])
    assert "as the train stage makes them (the run's `openmp_wait` tag)" in report.report(
        tmp_path)
    speed["loaded_rows"][1]["runs"][0]["flags"] = {"openmp_wait": "GOMP_SPINCOUNT=1000"}
    _write(tmp_path, speed, [0.997], [0.997])
    assert ("as the train stage makes them (`GOMP_SPINCOUNT=1000`, the run's `openmp_wait` "
            "tag)") in report.report(tmp_path)


def test_loaded_section_weighs_the_short_spin_against_libgomps_long_one(report, tmp_path):
    speed = _speed(3.0)
    _write(tmp_path, speed, [0.997], [0.997])
    assert "`longspin`" not in report.report(tmp_path)  # no longspin rows: no sentence
    speed["rows"].append(_row("longspin", 2750, 2.75))
    speed["loaded_rows"].append(_row("longspin", 625, 1.5625, load=1, slowdown=4.4))
    _write(tmp_path, speed, [0.997], [0.997])
    text = report.report(tmp_path)
    assert "| project default, libgomp's long OpenMP spin (no `GOMP_SPINCOUNT`) |" in text
    assert ("quiet, the default trains at 0.91x the long spin's speed; beside the busy "
            "process, at 2.00x (the long spin slows 4.40x under load, the short one 2.00x)"
            in text)


def test_profile_bounds_the_default_by_its_convolution_share(report, tmp_path):
    _write(tmp_path, _speed(3.0), [0.997], [0.997])
    text = report.report(tmp_path)
    assert "| convolution (oneDNN) | 1.000 | 62% |" in text  # (0.625 rounds to even)
    assert "run at 150 GFLOP/s under the profiler, 75% of the 200 GFLOP/s" in text
    assert "the fastest of 3 rounds on fresh models" in text
    assert "took 50.0 ms per step, the same steps unprofiled 40.0 ms" in text
    assert "the default would train at about 4.00x the reference (its 2.50x" in text


def test_profile_bounds_the_default_by_its_convolutions_timed_alone(report, tmp_path):
    """With the speed table's `convolutions` row, the bound is that row's ratio and the
    convolutions' rate is that row's (unprofiled), read against the measured multiply-add
    peak; the profiler's own cost is stated."""
    speed = _speed(3.0)
    alone = _row("convolutions", 3200, 3.2, test_accuracy=None)
    alone["runs"] = [{**alone["runs"][0], "flops": 180e9}]  # 180 GFLOP in 15000/3200 s
    speed["rows"].append(alone)
    _write(tmp_path, speed, [0.997], [0.997], fma_peak_gflops=48.0)
    text = report.report(tmp_path)
    assert ("| the default's oneDNN convolutions alone (no training) | 18.75 | 3200 | 3.20x | - |"
            in text)
    assert "took 50.0 ms per step, the same steps unprofiled 40.0 ms" in text
    assert ("the oneDNN convolutions run at 38 GFLOP/s, 80% of this CPU's fp32 multiply-add "
            "peak (48 GFLOP/s") in text
    assert "a 2048 x 2048 matrix multiply reaches 200 GFLOP/s" in text
    assert "The shares are of profiled time; the rate and the bound below come from" in text
    assert ("They take 18.75 s per epoch alone (forward, input and weight gradients on random "
            "data, nothing else; same invocation as the default row), 78% of the default's "
            "24.00 s: even if everything else in the step took no time at all, the default "
            "would train at about 3.20x the reference (it trains at 2.50x)") in text
    assert "4.00x" not in text  # not the share-based estimate


@pytest.mark.parametrize("bf16_ratio, bf16_acc, offered", [
    (3.0, [0.9972, 0.9970], False),   # too slow
    (4.5, [0.9960, 0.9962], False),   # fast, but 0.1 points worse
    (4.5, [0.9970, 0.9968], True),    # fast and within 0.05 points
])
def test_bf16_recipe_offered_only_when_fast_and_as_accurate(report, tmp_path, bf16_ratio,
                                                           bf16_acc, offered):
    _write(tmp_path, _speed(bf16_ratio), [0.9972, 0.9970], bf16_acc)
    text = report.report(tmp_path)
    assert "## bf16 autocast" in text and "| best-single:amp=bf16 | 17 | 2 |" in text
    assert f"\n\nIt trains at {bf16_ratio:.2f}x the reference loop" in text
    assert "The CPU of the speed table has avx512_bf16 and no AMX" in text
    assert ("offered as `recipes/bf16.yaml`" in text) is offered
    assert ("`amp` stays `none`" in text) is not offered


def test_gpu_section_shows_make_bench_gpu_and_the_time_to_the_target(report, tmp_path):
    assert "No GPU result is committed" in report.report(tmp_path)
    recipe = {"epochs": 17, "train_seconds": 51.0, "final_accuracy": 0.9971,
              "target_accuracy": 0.995, "accuracy_per_epoch": [0.99] * 17}
    cuda = {
        "machine": {**MACHINE, "gpu": "Test GPU", "cuda": "13.0"},
        "settings": {"epochs": 1, "steps": None, "repeats": 3, "batch_size": 100, "load": 0,
                     "recipe_file": "recipes/best-single.yaml",
                     "command": "bench/train_speed.py --device cuda"},
        "rows": [_row("reference", 4000, 1.0), _row("default", 40000, 10.0),
                 _row("bf16", 48000, 12.0)],
        "loaded_rows": [],
        "recipe": [{"variant": "default", **recipe, "epoch_reached": 6,
                    "seconds_to_target": 18.04},
                   {"variant": "bf16", **recipe, "epoch_reached": None,
                    "seconds_to_target": None}],
    }
    (tmp_path / "cuda.json").write_text(json.dumps(cuda))
    text = report.report(tmp_path).split("## Training speed (GPU)")[1]
    assert "GPU Test GPU (CUDA 13.0)" in text and "No GPU result" not in text
    assert "- Command: `make bench-gpu` (`python bench/train_speed.py --device cuda`)" in text
    assert "| project default | 1.50 | 40000 | 10.00x |" in text
    assert "### Time to 99.5%" in text and "`recipes/best-single.yaml`" in text
    assert "| project default | 17 | epoch 6 | 18.0 s | 99.71% | 51.0 s |" in text
    assert "| project, bf16 autocast (`amp: bf16`) | 17 | not reached | - | 99.71% |" in text
