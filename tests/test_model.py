"""The reference CNN: shapes, size, and that a training step learns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mnist_pipeline.model import DeployableModel, MnistCNN, count_parameters


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
