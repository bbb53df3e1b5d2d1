"""The fused CPU kernels (mnist_pipeline.fused): the same function, gradients and running
statistics as the eager modules, the max-pool's tie and NaN rules, the model-level forward,
their use by `fit`, and the fallback to the eager modules where they cannot be built."""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mnist_pipeline import fused
from mnist_pipeline.loop import build_state, fit, to_tensor
from mnist_pipeline.model import MnistCNN
from mnist_pipeline.params import TrainParams

from .conftest import load_real

CPU = torch.device("cpu")

if shutil.which(os.environ.get("CXX", "c++")) is None:  # pragma: no cover
    pytest.skip("no C++ compiler: the fused kernels cannot be built here (the pipeline then "
                "trains with the eager modules)", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def built():
    """Build (or load the cached build of) the extension once; it must succeed here."""
    assert fused.extension() is not None, fused.unavailable_reason()


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
    assert fused.status(off_params, CPU) == "off"
    off = fit(build_state(off_params, CPU), off_params, x, y)
    assert calls[0] == 2 * 2 * (600 // 50)
    for a, b in zip(on, off, strict=True):  # the same training, up to rounding
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-2)
    for option, why in (({"amp": "bf16"}, "amp"), ({"compile": True}, "compile")):
        assert fused.status(dataclasses.replace(params, **option), CPU) == \
            f"off ({why})"
    assert fused.status(params, torch.device("cuda")) == "off (cuda)"


def test_a_checkout_at_another_path_reuses_the_cached_build(tmp_path):
    # e.g. a `dvc exp run --queue` copy of the project: the same source at another path, in
    # another process. A small module stands in for the kernels (same build, quicker compile).
    source = ("#include <pybind11/pybind11.h>\n"
              "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.attr(\"answer\") = 42; }\n")
    load = ("import sys, pathlib\nfrom mnist_pipeline import fused\n"
            "fused.SOURCE = pathlib.Path(sys.argv[1])\nmodule = fused.extension()\n"
            "assert module is not None and module.answer == 42, fused.unavailable_reason()\n"
            "print(module.__file__)\n")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "builds")}
    builds = []
    for checkout in ("one", "two"):
        copy_ = tmp_path / checkout / "fused_bn.cpp"
        copy_.parent.mkdir()
        copy_.write_text(source)
        done = subprocess.run([sys.executable, "-c", load, str(copy_)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        so = Path(done.stdout.strip().splitlines()[-1])
        builds.append((so, so.stat().st_mtime_ns))
    assert builds[0] == builds[1]  # built once, not recompiled for the second path


def test_without_a_build_training_falls_back_to_the_eager_modules(monkeypatch, tmp_path):
    broken = tmp_path / "fused_bn.cpp"
    broken.write_text("#error deliberately broken\n")
    monkeypatch.setattr(fused, "SOURCE", broken)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "builds"))
    fused.extension.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="fused CPU kernels unavailable"):
            status = fused.status(TrainParams(), CPU)
        assert status.startswith("unavailable (") and "deliberately broken" in status
        calls = _count_fused_calls(monkeypatch)
        x, y = _subset()
        params = TrainParams(epochs=1, batch_size=50)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once, not at every step
            history = fit(build_state(params, CPU), params, x, y)
        assert calls[0] == 0 and history[0]["train_loss"] > 0
    finally:
        fused.extension.cache_clear()
