"""The fused CPU kernels (mnist_pipeline.fused, built by mnist_pipeline.fused_build): the same
function, gradients and running statistics as the eager modules, the same bits with any thread
count, the max-pool's tie and NaN rules, the model-level forward, their use by `fit` and the
`fused_kernels` tag, the fallback to the eager modules (a failed build, a model they do not
take) with one warning, `mnist-pipeline build-kernels`, the cached build reused whatever ninja
PATH finds first, and builds killed or stuck while holding their lock."""

from __future__ import annotations

import copy
import dataclasses
import errno
import fcntl
import functools
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mnist_pipeline import fused, fused_build, loop
from mnist_pipeline.loop import build_state, fit, to_tensor
from mnist_pipeline.model import MnistCNN
from mnist_pipeline.params import TrainParams
from mnist_pipeline.tracking import NullTracker
from mnist_pipeline.train_stage import TrainOutputs, run_training

from .conftest import load_real, mnist_mirror

CPU = torch.device("cpu")

if shutil.which(os.environ.get("CXX", "c++")) is None:  # pragma: no cover
    pytest.skip("no C++ compiler: the fused kernels cannot be built here (the pipeline then "
                "trains with the eager modules)", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def built():
    """Build (or load the cached build of) the extension once; it must succeed here."""
    assert fused_build.extension() is not None, fused_build.unavailable_reason()


def _input(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    x[:, :, : h // 3] = 0.25  # a constant band, as MNIST's background: ties in every window
    return x.contiguous(memory_format=torch.channels_last)


def _bn(c: int, seed: int = 1) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():  # some negative scales: the max of BN(x) is not BN of the max
        bn.weight.copy_(torch.randn(c, generator=g))
        bn.bias.copy_(torch.randn(c, generator=g) * 0.1)
        bn.running_var.uniform_(0.5, 2.0, generator=g)
    return bn.train()


def _eager(x, bn, pool):
    y = bn(x)
    return F.relu(F.max_pool2d(y, 2, 2) if pool else y)


def _run(fn, x, bn, grad):
    x = x.clone().requires_grad_()
    out = fn(x, bn)
    dx, dw, db = torch.autograd.grad(out, [x, bn.weight, bn.bias], grad)
    return out, dx, dw, db


@pytest.mark.parametrize("pool", [False, True], ids=["bn_relu", "bn_pool_relu"])
@pytest.mark.parametrize("shape", [(8, 16, 28, 28), (6, 32, 14, 14), (4, 64, 7, 7),
                                   (5, 5, 15, 9), (2, 80, 6, 6)],
                         ids=["c16", "c32", "c64-odd", "c5-odd-generic", "c80-generic-blocks"])
def test_same_function_gradients_and_running_stats_as_eager(pool, shape):
    n, c, h, w = shape
    x = _input(*shape)
    out_shape = (n, c, h // 2, w // 2) if pool else shape
    grad = torch.randn(out_shape, generator=torch.Generator().manual_seed(2))
    bn_ref, bn_eager, bn_fused = _bn(c).double(), _bn(c), _bn(c)
    ref = _run(lambda v, b: _eager(v, b, pool), x.double(), bn_ref, grad.double())
    eager = _run(lambda v, b: _eager(v, b, pool), x, bn_eager, grad)
    got = _run(fused.bn_pool_relu if pool else fused.bn_relu, x, bn_fused, grad)
    for name, r, e, f in zip(("out", "dx", "dweight", "dbias"), ref, eager, got, strict=True):
        assert f.shape == e.shape and f.dtype == torch.float32, name
        # within 1e-4 of float64 relative to the largest value (measured: ~1e-6; a wrong tie,
        # mask or leftover row would be off by the size of a gradient)
        scale = r.abs().max().item() or 1.0
        assert (f.double() - r).abs().max().item() <= 1e-4 * scale, name
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(bn_fused, name), getattr(bn_eager, name))
    assert bn_fused.num_batches_tracked.item() == bn_eager.num_batches_tracked.item() == 1


@pytest.mark.parametrize("pool", [False, True], ids=["bn_relu", "bn_pool_relu"])
def test_statistics_of_activations_far_from_zero(pool):
    # the kernels take the variance from sums of x and x^2 (in double, one pass): with a mean
    # 3000 standard deviations from 0 the output and statistics must still match float64, and
    # the gradients (float32's x - mean loses digits here, in eager as in the kernels) be no
    # further from it than eager's
    x = (_input(8, 16, 14, 14) * 0.01 + 30.0).contiguous(memory_format=torch.channels_last)
    grad = torch.randn((8, 16, 7, 7) if pool else (8, 16, 14, 14),
                       generator=torch.Generator().manual_seed(2))
    bn_ref, bn_eager, bn_fused = _bn(16).double(), _bn(16), _bn(16)
    ref = _run(lambda v, b: _eager(v, b, pool), x.double(), bn_ref, grad.double())
    eager = _run(lambda v, b: _eager(v, b, pool), x, bn_eager, grad)
    got = _run(fused.bn_pool_relu if pool else fused.bn_relu, x, bn_fused, grad)
    for name, r, e, f in zip(("out", "dx", "dweight", "dbias"), ref, eager, got, strict=True):
        bound = 1e-4 * (r.abs().max().item() or 1.0)
        if name != "out":
            bound = max(bound, 2 * (e.double() - r).abs().max().item())
        assert (f.double() - r).abs().max().item() <= bound, name
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(bn_fused, name).double(), getattr(bn_ref, name),
                                   rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(8, 16, 28, 28), (3, 5, 7, 9), (2, 80, 6, 5)],
                         ids=["c16", "c5-odd-generic", "c80-generic-blocks"])
def test_first_conv_block_same_function_gradients_and_running_stats(shape):
    # conv_bn_relu recomputes the 1-channel 3x3 convolution instead of storing it; padding,
    # taps and the weight gradient must be eager's (a tap off by one pixel is far off)
    n, c, h, w = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, h, w, generator=g)
    x[:, :, : h // 3] = -0.42  # a constant band (MNIST's background)
    grad = torch.randn(n, c, h, w, generator=g)

    def layers(dtype):
        torch.manual_seed(1)
        conv, bn = nn.Conv2d(1, c, 3, padding=1), _bn(c)
        return conv.to(dtype), bn.to(dtype)

    results = {}
    for kind, dtype in (("ref", torch.float64), ("eager", torch.float32),
                        ("fused", torch.float32)):
        conv, bn = layers(dtype)
        xx, gg = x.to(dtype), grad.to(dtype)
        y = fused.conv_bn_relu(xx, conv, bn) if kind == "fused" else F.relu(bn(conv(xx)))
        grads = torch.autograd.grad(y, [conv.weight, conv.bias, bn.weight, bn.bias], gg)
        results[kind] = (y, *grads, bn.running_mean, bn.running_var)
    names = ("out", "dconv_weight", "dconv_bias", "dweight", "dbias", "running_mean",
             "running_var")
    dconv_scale = results["ref"][1].abs().max().item()
    for i, name in enumerate(names):
        r, f = results["ref"][i], results["fused"][i]
        assert f.shape == r.shape and f.dtype == torch.float32, name
        # (the conv bias's gradient is 0 but for rounding: BatchNorm subtracts the mean)
        scale = dconv_scale if name == "dconv_bias" else r.abs().max().item() or 1.0
        assert (f.double() - r).abs().max().item() <= 1e-5 * scale, name
    with pytest.raises(ValueError, match="no gradient for its input"):
        fused.conv_bn_relu(x.requires_grad_(), *layers(torch.float32))


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["scale+", "scale-"])
def test_pool_routes_ties_to_the_first_maximum_in_row_major_order(sign):
    # every window holds two values a < b in one of the tie patterns below: a row-major scan
    # picks a different element than a column-major one for most of them
    patterns = torch.tensor([[[0, 1], [1, 0]], [[1, 0], [0, 1]], [[0, 0], [1, 1]],
                             [[0, 1], [0, 1]], [[1, 1], [1, 1]], [[1, 0], [1, 0]]])
    g = torch.Generator().manual_seed(3)
    n, c, hw = 4, 16, 8
    a = torch.randn(n, c, hw // 2, hw // 2, generator=g)
    b = a + 0.1 + torch.rand(n, c, hw // 2, hw // 2, generator=g)
    which = torch.randint(0, len(patterns), (n, c, hw // 2, hw // 2), generator=g)
    mask = patterns[which].permute(0, 1, 2, 4, 3, 5).reshape(n, c, hw, hw).bool()
    up = lambda t: t.repeat_interleave(2, 2).repeat_interleave(2, 3)  # noqa: E731
    x = torch.where(mask, up(b), up(a)).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(n, c, hw // 2, hw // 2, generator=g)
    bn_eager, bn_fused = _bn(c), _bn(c)
    weight = sign * (0.5 + torch.rand(c, generator=g))
    with torch.no_grad():  # sign -1: the maximum of BN(x) is at the smaller value
        for bn in (bn_eager, bn_fused):
            bn.weight.copy_(weight)
    eager = _run(lambda v, m: _eager(v, m, pool=True), x, bn_eager, grad)
    got = _run(fused.bn_pool_relu, x, bn_fused, grad)
    for name, e, f in zip(("out", "dx", "dweight", "dbias"), eager, got, strict=True):
        torch.testing.assert_close(f, e, rtol=1e-4, atol=1e-5, msg=name)


def test_nan_inputs_give_nan_where_eager_does():
    bn = _bn(16)
    x = _input(2, 16, 8, 8)
    x[0, 3, 5, 5] = float("nan")
    with torch.no_grad():
        want = _eager(x, copy.deepcopy(bn), pool=True)
        got = fused.bn_pool_relu(x, bn)
    # (a NaN input makes its channel's batch statistics NaN: the whole channel, as eager)
    assert torch.equal(got.isnan(), want.isnan()) and got[:, 3].isnan().all()
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num())


def test_model_forward_matches_the_model_and_eval_mode_is_untouched():
    torch.manual_seed(0)
    model = MnistCNN().to(memory_format=torch.channels_last).train()
    twin, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    assert fused.supports(model) and not fused.supports(nn.Sequential(nn.Linear(2, 2)))
    images, labels = load_real("train", 64)
    x = to_tensor(images, 0.1307, 0.3081, CPU, channels_last=True)
    y = torch.from_numpy(labels)
    F.cross_entropy(fused.forward(model, x), y).backward()
    F.cross_entropy(twin(x), y).backward()
    F.cross_entropy(ref(x.double()), y).backward()
    for (name, p), q, r in zip(model.named_parameters(), twin.parameters(), ref.parameters(),
                               strict=True):
        if name in ("features.0.bias", "features.3.bias", "features.7.bias"):
            continue  # a bias before BatchNorm has a zero gradient: only rounding is left
        scale = r.grad.abs().max().item()
        eager_error = (q.grad.double() - r.grad).abs().max().item()
        fused_error = (p.grad.double() - r.grad).abs().max().item()
        assert fused_error <= max(2 * eager_error, 1e-5 * scale), name
    for a, b in zip(model.buffers(), twin.buffers(), strict=True):  # running estimates
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    model.eval()  # evaluation never involves the kernels: bit for bit the model
    with torch.no_grad():
        assert torch.equal(fused.forward(model, x), model(x))


def test_model_forward_gives_the_input_its_gradient_when_asked():
    # the fused first block computes no input gradient: with an input that needs one, the
    # first convolution runs as the module (e.g. for saliency maps or adversarial examples)
    torch.manual_seed(0)
    model = MnistCNN().to(memory_format=torch.channels_last).train()
    twin, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    x = to_tensor(load_real("train", 16)[0], 0.1307, 0.3081, CPU, channels_last=True)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_(),
          x.double().requires_grad_()]
    for net, xx in zip((functools.partial(fused.forward, model), twin, ref), xs, strict=True):
        net(xx).square().sum().backward()
    got, eager, want = (xx.grad.double() for xx in xs)
    scale = want.abs().max().item()
    assert scale > 0
    assert (got - want).abs().max().item() <= max(2 * (eager - want).abs().max().item(),
                                                  1e-5 * scale)


@pytest.mark.parametrize("change", ["frozen-bn", "hook", "nchw", "subclass", "autocast"])
def test_model_forward_is_plainly_the_model_where_the_kernels_do_not_apply(
        change, monkeypatch):
    torch.manual_seed(0)
    model = MnistCNN().to(memory_format=torch.channels_last).train()
    x = to_tensor(load_real("train", 16)[0], 0.1307, 0.3081, CPU, channels_last=True)
    calls = _count_fused_calls(monkeypatch)
    seen = []
    if change == "frozen-bn":
        model.features[4].eval()  # uses its running statistics: the kernels use the batch's
    elif change == "hook":
        model.features[6].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    elif change == "nchw":
        model = model.to(memory_format=torch.contiguous_format)
    elif change == "subclass":
        class Scaled(MnistCNN):
            def forward(self, x):
                return 2 * super().forward(x)
        scaled = Scaled().to(memory_format=torch.channels_last).train()
        scaled.load_state_dict(model.state_dict())
        model = scaled
    twin = copy.deepcopy(model)
    with torch.autocast("cpu", torch.bfloat16, enabled=change == "autocast"):
        got = fused.forward(model, x)
        want = twin(x)
    assert calls[0] == 0 and torch.equal(got, want)
    assert len(seen) == (2 if change == "hook" else 0)  # (the twin is a copy, hook and all)


def _count_fused_calls(monkeypatch) -> list[int]:
    calls = [0]
    original = fused.bn_pool_relu

    def counting(x, bn):
        calls[0] += 1
        return original(x, bn)

    monkeypatch.setattr(fused, "bn_pool_relu", counting)
    return calls


def _subset():
    images, labels = load_real("train", 600)
    return to_tensor(images, 0.1307, 0.3081, CPU, True), torch.from_numpy(labels)


def test_fit_uses_the_kernels_by_default_and_learns_as_eager(monkeypatch):
    params = TrainParams(epochs=2, batch_size=50)
    assert params.fused_kernels and fused.status(params, CPU) == "on"
    calls = _count_fused_calls(monkeypatch)
    x, y = _subset()
    on = fit(build_state(params, CPU), params, x, y)
    assert calls[0] == 2 * 2 * (600 // 50)  # two pooled blocks a step
    off_params = dataclasses.replace(params, fused_kernels=False)
    assert fused.status(off_params, CPU) == "off (disabled by params)"
    off = fit(build_state(off_params, CPU), off_params, x, y)
    assert calls[0] == 2 * 2 * (600 // 50)
    for a, b in zip(on, off, strict=True):  # the same training, up to rounding
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-2)
    for option, why in (({"amp": "bf16"}, "amp bf16"), ({"compile": True}, "torch.compile"),
                        ({"channels_last": False}, "needs channels_last")):
        assert fused.status(dataclasses.replace(params, **option), CPU) == f"off ({why})"
    assert fused.status(params, torch.device("cuda")) == "off (device not CPU: cuda)"


# A small module stands in for the kernels in build tests (same build, quicker compile), and
# a script that loads it as the kernels, in a process of its own: the source's path is argv[1].
SMALL_SOURCE = ("#include <pybind11/pybind11.h>\n"
                "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.attr(\"answer\") = 42; }\n")
LOAD_SMALL = ("import os, sys, pathlib\nfrom mnist_pipeline import fused_build as fb\n"
              "path = os.environ['PATH']\n"
              "fb.SOURCE = pathlib.Path(sys.argv[1])\nmodule = fb.extension()\n"
              "assert module is not None and module.answer == 42, fb.unavailable_reason()\n"
              "assert os.environ['PATH'] == path\n"
              "print(module.__file__)\n")


def _build_small(source: Path, env: dict[str, str]) -> tuple[Path, int]:
    """Build (or load) the small module from `source`: its library and the library's mtime."""
    source.write_text(SMALL_SOURCE)
    done = subprocess.run([sys.executable, "-c", LOAD_SMALL, str(source)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    so = Path(done.stdout.strip().splitlines()[-1])
    return so, so.stat().st_mtime_ns


def test_a_checkout_at_another_path_reuses_the_cached_build(tmp_path):
    # e.g. a `dvc exp run --queue` copy of the project: the same source at another path, in
    # another process.
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "builds")}
    builds = []
    for checkout in ("one", "two"):
        (tmp_path / checkout).mkdir()
        builds.append(_build_small(tmp_path / checkout / "fused_bn.cpp", env))
    assert builds[0] == builds[1]  # built once, not recompiled for the second path


def test_the_build_runs_the_ninja_package_whatever_ninja_path_finds_first(tmp_path):
    # Ninja versions keep incompatible build logs: `make` puts the venv's ninja first on PATH,
    # a shell may find the system's, and each would compile the cached kernels again (inside
    # a training) after the other. Here the first `ninja` on PATH fails, and is not run.
    decoy = tmp_path / "bin" / "ninja"
    decoy.parent.mkdir()
    decoy.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'decoy-ran'}\nexit 1\n")
    decoy.chmod(0o755)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "builds")}
    first = _build_small(tmp_path / "fused_bn.cpp", env)
    env["PATH"] = f"{decoy.parent}{os.pathsep}{env['PATH']}"
    assert _build_small(tmp_path / "fused_bn.cpp", env) == first  # not rebuilt either
    assert not (tmp_path / "decoy-ran").exists()


def test_the_build_path_adds_only_the_packaged_ninja_and_is_restored(monkeypatch):
    import ninja

    path = os.environ["PATH"]
    with fused_build._packaged_ninja():
        first = Path(os.environ["PATH"].split(os.pathsep)[0])
        assert [p.name for p in first.iterdir()] == ["ninja"]
        assert (first / "ninja").resolve() == (Path(ninja.BIN_DIR) / "ninja").resolve()
        assert os.environ["PATH"].endswith(os.pathsep + path)
    assert os.environ["PATH"] == path and not first.exists()
    monkeypatch.setattr(ninja, "BIN_DIR", "")  # (the package's answer when it has no binary)
    with fused_build._packaged_ninja():
        assert os.environ["PATH"] == path


@pytest.mark.parametrize("cause", ["compile-error", "no-compiler"])
def test_without_a_build_training_falls_back_with_one_warning(cause, monkeypatch, tmp_path,
                                                               capfd):
    if cause == "compile-error":
        broken = tmp_path / "fused_bn.cpp"
        broken.write_text("#error deliberately broken\n")
        monkeypatch.setattr(fused_build, "SOURCE", broken)
        telling = "deliberately broken"
    else:
        monkeypatch.setenv("CXX", "/nonexistent")
        telling = "/nonexistent"  # (the shell's words for it vary)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "builds"))
    fused_build.extension.cache_clear()
    try:
        params = TrainParams(epochs=1, batch_size=50)
        status = fused.status(params, CPU, MnistCNN().to(memory_format=torch.channels_last))
        assert status.startswith("off (build failed: ") and telling in status
        calls = _count_fused_calls(monkeypatch)
        x, y = _subset()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # every warning, not once per place
            history = fit(build_state(params, CPU), params, x, y)
        assert calls[0] == 0 and history[0]["train_loss"] > 0
        assert [str(w.message) for w in caught] == [
            f"fused CPU kernels not used ({status[5:-1]}); training with the eager modules "
            "(same results up to rounding)"]
        assert capfd.readouterr().err == ""  # no compiler banner, no traceback
    finally:
        fused_build.extension.cache_clear()


class _AvgPooled(MnistCNN):
    """MnistCNN with an average pool in its second block: a model the kernels do not take."""

    def __init__(self) -> None:
        super().__init__()
        self.features[5] = nn.AvgPool2d(2)


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    from mnist_pipeline.download import download

    out = tmp_path_factory.mktemp("raw") / "raw"
    download(out, [str(mnist_mirror())])
    return out


def test_a_model_the_kernels_do_not_take_is_tagged_off_with_one_warning(monkeypatch,
                                                                        raw_dir, tmp_path):
    # e.g. model.py edited: the run's tag says what trained it, and training says so once
    params = TrainParams(epochs=1, train_subset=200, batch_size=50)
    why = ("model not supported: features.5 is AvgPool2d(kernel_size=2, stride=2, padding=0), "
           "not a MaxPool2d(2, 2)")
    assert fused.status(params, CPU, _AvgPooled()) == f"off ({why})"
    assert fused.status(params, CPU, MnistCNN().to(memory_format=torch.channels_last)) == "on"
    monkeypatch.setattr(loop, "MnistCNN", _AvgPooled)
    calls = _count_fused_calls(monkeypatch)

    class Tags(NullTracker):
        seen: dict[str, str] = {}

        def set_tags(self, tags):
            self.seen.update(tags)

    out = TrainOutputs(*(tmp_path / f for f in ("w.pt", "m.json", "h.json", "r.json")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_training(params, raw_dir, {"mean": 0.1307, "std": 0.3081}, out, CPU, Tags(),
                     print_fn=lambda line: None)
    assert calls[0] == 0
    assert Tags.seen["fused_kernels"] == f"off ({why})"
    assert Tags.seen["fused_kernels_build"] == "none"
    assert [str(w.message) for w in caught if "fused" in str(w.message)] == [
        f"fused CPU kernels not used ({why}); training with the eager modules (same results "
        "up to rounding)"]


def test_the_kernels_give_the_same_bits_with_any_thread_count():
    # their sums are split into a fixed number of chunks, not one per thread. The inputs sit
    # 1000 standard deviations from zero, where the sums' grouping shows in float results
    # (with one chunk per thread, 1 and 2 threads differ here)
    g = torch.Generator().manual_seed(5)
    x1 = torch.randn(32, 1, 28, 28, generator=g) + 1000
    x2 = (torch.randn(32, 32, 28, 28, generator=g) + 1000).contiguous(
        memory_format=torch.channels_last)
    x3 = (torch.randn(32, 64, 14, 14, generator=g) + 1000).contiguous(
        memory_format=torch.channels_last)

    def run() -> list[torch.Tensor]:
        torch.manual_seed(0)
        conv, bns = nn.Conv2d(1, 16, 3, padding=1), [_bn(16), _bn(32), _bn(64)]
        y1 = fused.conv_bn_relu(x1, conv, bns[0])
        y2 = fused.bn_relu(x2, bns[1])
        x3g = x3.clone().requires_grad_()
        y3 = fused.bn_pool_relu(x3g, bns[2])
        loss = sum((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum()
                   for y in (y1, y2, y3))
        leaves = [conv.weight, conv.bias, x3g, *(p for bn in bns for p in bn.parameters())]
        grads = torch.autograd.grad(loss, leaves)
        return [y1, y2, y3, *grads, *(b for bn in bns for b in bn.buffers())]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    code = "import sys\nfrom mnist_pipeline.cli import main\nmain(sys.argv[1:])\n"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                          text=True, timeout=900)


def test_build_kernels_after_a_build_killed_mid_compile(tmp_path):
    # A real build, killed (its whole process group, as a job manager or Ctrl-C would) while
    # the compiler runs: torch's flock dies with it, the `lock` file stays and blocks nothing,
    # and `mnist-pipeline build-kernels` builds, checks and says where the library is.
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "builds")}
    env.pop("CXX", None)
    build = subprocess.Popen([sys.executable, "-c", "from mnist_pipeline import fused_build\n"
                              "fused_build.build()"], env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "builds").glob("*/build.ninja")):
            assert build.poll() is None and time.monotonic() < deadline, "no build started"
            time.sleep(0.1)
        time.sleep(3)  # ninja runs the compiler (which takes about a minute)
    finally:
        os.killpg(build.pid, signal.SIGKILL)
        build.wait()
    (folder,) = (tmp_path / "builds").iterdir()
    assert fused_build.lock_state(folder / "lock") == "free"  # left behind, held by no one
    assert not list(folder.glob("*.so"))
    done = _cli("build-kernels", env=env)
    assert done.returncode == 0, done.stderr
    assert "did not finish (killed or failed; its lock was released): building again" in \
        done.stderr
    library = Path(done.stdout.split("fused CPU kernels: ")[1].split(" (compiled in ")[0])
    assert library.parent == folder and library.is_file()
    assert done.stdout.rstrip().endswith("they match the eager modules")
    again = _cli("build-kernels", env=env)
    assert again.returncode == 0 and "(cached build)" in again.stdout and not again.stderr
    failed = _cli("build-kernels", env={**env, "CXX": "/nonexistent"})
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.startswith("error: the fused CPU kernels cannot be built ")
    assert "/nonexistent" in failed.stderr and len(failed.stderr.splitlines()) == 1
    assert failed.stderr.endswith("; training will use the eager modules\n")


@pytest.mark.parametrize("how", ["held", "marker"])
def test_a_stale_build_lock_is_cleared_with_a_message(how, tmp_path, monkeypatch):
    # 'held': a live process holds the flock and its build made no progress (stuck, stopped);
    # 'marker': a file system without flock, where filelock's marker file is the lock
    folder = tmp_path / "build"
    folder.mkdir()
    (folder / "build.ninja").write_text("")
    lock = folder / "lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time\nf = open(sys.argv[1], 'w')\n"
         "fcntl.flock(f, fcntl.LOCK_EX)\nprint(flush=True)\ntime.sleep(600)", str(lock)],
        stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()  # it holds the lock
        if how == "marker":
            real_flock = fcntl.flock

            def no_flock(fd, op):
                raise OSError(errno.ENOSYS, "Function not implemented")

            monkeypatch.setattr(fcntl, "flock", no_flock)
        assert fused_build.lock_state(lock) == how
        assert fused_build.clear_stale_lock(folder) is None  # just now: a build in progress
        old = time.time() - fused_build.LOCK_IDLE_LIMIT - 60
        for path in folder.iterdir():
            os.utime(path, (old, old))
        message = fused_build.clear_stale_lock(folder)
        assert message is not None and not lock.exists()
        who = (f"held by process {holder.pid}" if how == "held"
               else "a marker file: no flock on this file system")
        assert message == (f"cleared the stale build lock {lock} ({who}; no build progress "
                           "for 11 min)")
        if how == "marker":
            monkeypatch.setattr(fcntl, "flock", real_flock)
        from filelock import FileLock

        with FileLock(lock, timeout=5):  # as torch takes it: no longer blocked
            pass
    finally:
        holder.kill()
        holder.wait()
