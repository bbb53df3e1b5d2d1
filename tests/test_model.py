"""The reference CNN: shapes, size, that a training step learns, and that it computes the
reference's function and gradients bit for bit."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mnist_pipeline.model import DeployableModel, MnistCNN, count_parameters

from .conftest import ROOT


def reference_layers() -> nn.Module:
    """The blog post's network class as published (bench/reference.py): ReLU before each
    max-pool, not in place; the same parameters in the same order, under other names."""
    spec = importlib.util.spec_from_file_location("reference", ROOT / "bench" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CNN()


def digit_like_batch(n: int, seed: int) -> torch.Tensor:
    """Normalised images with a constant background (ties in every pooling window) and
    strokes, like MNIST's."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.zeros(n, 1, 28, 28)
    strokes = torch.rand(n, 1, 16, 16, generator=g)
    pixels[:, :, 6:22, 6:22] = torch.where(strokes > 0.6, strokes, torch.zeros(()))
    return (pixels - 0.1307) / 0.3081


@pytest.mark.parametrize("batch", [1, 37, 100])
def test_output_shape_any_batch_size(batch):
    model = MnistCNN().eval()
    assert model(torch.randn(batch, 1, 28, 28)).shape == (batch, 10)


def test_short_last_batch_in_training_mode():
    # the reference's view(batch_size, -1) fails here; flatten(1) does not
    assert MnistCNN().train()(torch.randn(37, 1, 28, 28)).shape == (37, 10)


def test_parameter_count_is_the_reference():
    assert count_parameters(MnistCNN()) == 434_346


def test_one_step_lowers_the_loss():
    torch.manual_seed(0)
    model = MnistCNN()
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(2):
        model.train()
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    assert losses[1] < losses[0]


def test_deployable_model_normalises_and_returns_probabilities():
    net = MnistCNN().eval()
    wrapped = DeployableModel(net, mean=0.1307, std=0.3081).eval()
    pixels = torch.rand(5, 1, 28, 28)
    probs = wrapped(pixels)
    torch.testing.assert_close(probs.sum(1), torch.ones(5))
    torch.testing.assert_close(probs, torch.softmax(net((pixels - 0.1307) / 0.3081), 1))


def test_deployable_copy_is_channels_last_and_computes_the_same():
    from mnist_pipeline.registry import deployable

    torch.manual_seed(0)
    net = MnistCNN()
    net(torch.randn(8, 1, 28, 28))  # some batch statistics in the running estimates
    net.eval()
    served = deployable(net, 0.1307, 0.3081, tta=True)
    convs = [m for m in served.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 and all(
        c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert not any(m.training for m in served.modules())
    assert next(net.parameters()).is_contiguous()  # the original is left as it was
    pixels = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        expected = DeployableModel(net, 0.1307, 0.3081, tta=True).eval()(pixels)
        torch.testing.assert_close(served(pixels), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_same_function_and_gradients_as_the_reference_layer_order(channels_last):
    # MnistCNN applies each ReLU after its max-pool and in place (faster); the outputs,
    # the loss, every parameter's gradient and the BatchNorm running statistics must equal
    # the reference's bit for bit, through three training steps.
    torch.manual_seed(0)
    ours, reference = MnistCNN(), reference_layers()
    names = dict(zip(reference.state_dict(), ours.state_dict(), strict=True))
    assert all(name.split(".", 1)[1] == names[name].split(".", 1)[1] for name in names)
    reference.load_state_dict({ref: ours.state_dict()[name] for ref, name in names.items()})
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ours, reference = ours.to(memory_format=fmt), reference.to(memory_format=fmt)
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (ours, reference)]
    for step in range(3):
        x = digit_like_batch(32, step).contiguous(memory_format=fmt)
        y = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(step))
        losses = []
        for model, optimizer in zip((ours, reference), optimizers, strict=True):
            optimizer.zero_grad()
            loss = F.cross_entropy(model.train()(x), y)
            loss.backward()
            optimizer.step()
            losses.append(loss)
        assert torch.equal(losses[0], losses[1])
        for (name, a), b in zip(ours.named_parameters(), reference.parameters(), strict=True):
            assert torch.equal(a.grad, b.grad), name
        for (name, a), b in zip(ours.state_dict().items(), reference.state_dict().values(),
                                strict=True):
            assert torch.equal(a, b), name
    x = digit_like_batch(50, 99).contiguous(memory_format=fmt)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), reference.eval()(x))
