"""The fused CPU kernels (mnist_pipeline.fused): the same function, gradients and running
statistics as the eager modules, the max-pool's tie and NaN rules, the model-level forward,
their use by `fit`, and the fallback to the eager modules where they cannot be built."""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mnist_pipeline import fused
from mnist_pipeline.model import MnistCNN
from mnist_pipeline.params import TrainParams
from mnist_pipeline.train import build_state, fit, fused_kernels_status, to_tensor

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
                                   (5, 5, 15, 9)],
                         ids=["c16", "c32", "c64-odd", "c5-odd-generic"])
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
        scale = r.abs().max().item() or 1.0
        # as close to float64 as eager float32 is, or closer (a wrong tie or mask would be
        # off by the size of a gradient)
        tolerance = max(2 * (e.double() - r).abs().max().item(), 1e-5 * scale)
        assert (f.double() - r).abs().max().item() <= tolerance, name
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(bn_fused, name), getattr(bn_eager, name))
    assert bn_fused.num_batches_tracked.item() == bn_eager.num_batches_tracked.item() == 1


def test_pool_keeps_the_first_maximum_and_propagates_nan():
    bn = _bn(16)
    x = _input(2, 16, 8, 8)
    x[0, 3, 5, 5] = float("nan")
    with torch.no_grad():
        want = _eager(x, copy.deepcopy(bn), pool=True)
        got = fused.bn_pool_relu(x, bn)
    # (a NaN input makes its channel's batch statistics NaN: the whole channel, as eager)
    assert torch.equal(got.isnan(), want.isnan()) and got[0, 3].isnan().all()
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num())
    # all four positions of a window tied: the gradient goes to the first one only
    bn = _bn(16)
    x = torch.full((2, 16, 4, 4), 0.5).contiguous(memory_format=torch.channels_last)
    x[1] = torch.randn(16, 4, 4)  # (a batch of one constant image has no variance)
    x.requires_grad_()
    out = fused.bn_pool_relu(x, bn)
    out.backward(torch.ones_like(out))
    x2 = x.detach().clone().requires_grad_()
    out2 = _eager(x2, _bn(16), pool=True)
    out2.backward(torch.ones_like(out2))
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)


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
    assert params.fused_kernels and fused_kernels_status(params, CPU) == "on"
    calls = _count_fused_calls(monkeypatch)
    x, y = _subset()
    on = fit(build_state(params, CPU), params, x, y)
    assert calls[0] == 2 * 2 * (600 // 50)  # two pooled blocks a step
    off_params = dataclasses.replace(params, fused_kernels=False)
    assert fused_kernels_status(off_params, CPU) == "off"
    off = fit(build_state(off_params, CPU), off_params, x, y)
    assert calls[0] == 2 * 2 * (600 // 50)
    for a, b in zip(on, off, strict=True):  # the same training, up to rounding
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-2)
    for option, why in (({"amp": "bf16"}, "amp"), ({"compile": True}, "compile")):
        assert fused_kernels_status(dataclasses.replace(params, **option), CPU) == \
            f"off ({why})"
    assert fused_kernels_status(params, torch.device("cuda")) == "off (cuda)"


def test_without_a_build_training_falls_back_to_the_eager_modules(monkeypatch, tmp_path):
    monkeypatch.setattr(fused, "SOURCE", tmp_path / "missing.cpp")
    fused.extension.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="fused CPU kernels unavailable"):
            status = fused_kernels_status(TrainParams(), CPU)
        assert status.startswith("unavailable (FileNotFoundError")
        calls = _count_fused_calls(monkeypatch)
        x, y = _subset()
        params = TrainParams(epochs=1, batch_size=50)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once, not at every step
            history = fit(build_state(params, CPU), params, x, y)
        assert calls[0] == 0 and history[0]["train_loss"] > 0
    finally:
        fused.extension.cache_clear()


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "some-build" / "lock"
    lock.parent.mkdir()
    lock.touch()  # a build in progress elsewhere: torch waits for it
    assert fused._build_directory("some-build") == lock.parent and lock.exists()
    old = time.time() - fused.STALE_LOCK_SECONDS - 1  # left by a killed build: torch would
    os.utime(lock, (old, old))                        # wait for it forever
    with pytest.warns(RuntimeWarning, match="stale build lock"):
        fused._build_directory("some-build")
    assert not lock.exists()
    assert fused.build_name().startswith("mnist_fused_bn_")
