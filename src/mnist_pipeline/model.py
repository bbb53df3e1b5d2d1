"""The reference CNN (from the blog post this project reproduces) and its deployable wrapper.

`MnistCNN` maps normalised images (B, 1, 28, 28) to logits (B, 10) for any batch size.
`DeployableModel` wraps it with the training statistics and a softmax, so that a served model
takes raw pixels in [0, 1] (as torchvision's ToTensor gives them) and returns probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .augment import shifted_views


@dataclass(frozen=True)
class CNNConfig:
    """Layer widths of the reference model; the defaults are the reference's."""

    channels: tuple[int, int, int] = (16, 32, 64)
    hidden: tuple[int, int] = (128, 64)
    num_classes: int = 10
    image_size: int = 28


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out)]


def _relu() -> nn.ReLU:
    # In place: the preceding BatchNorm / MaxPool do not need their output for backward.
    return nn.ReLU(inplace=True)


class MnistCNN(nn.Module):
    """Conv-BN-ReLU x3 with two max-pools, then Linear-BN-ReLU x2 and a linear classifier.

    Where a max-pool follows a ReLU, the ReLU is applied after the pool instead:
    relu(maxpool(x)) == maxpool(relu(x)) exactly (both only select and compare), with the
    same gradients, on a quarter of the elements. The function, its gradients and the
    parameter names (state dicts) are the reference's; tests/test_model.py checks this
    bit for bit against the reference's layer order.
    """

    def __init__(self, config: CNNConfig = CNNConfig()) -> None:
        super().__init__()
        c1, c2, c3 = config.channels
        h1, h2 = config.hidden
        self.features = nn.Sequential(
            *_conv_bn(1, c1), _relu(),  # (B, 16, 28, 28)
            *_conv_bn(c1, c2),  # (B, 32, 28, 28)
            nn.MaxPool2d(2, 2), _relu(),  # (B, 32, 14, 14)
            *_conv_bn(c2, c3),  # (B, 64, 14, 14)
            nn.MaxPool2d(2, 2), _relu(),  # (B, 64, 7, 7)
        )
        flat = c3 * (config.image_size // 4) ** 2  # 3136 for the reference
        self.classifier = nn.Sequential(
            nn.Linear(flat, h1), nn.BatchNorm1d(h1), _relu(),
            nn.Linear(h1, h2), nn.BatchNorm1d(h2), _relu(),
            nn.Linear(h2, config.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # flatten(1) instead of the reference's view(batch_size, -1): any batch size works
        return self.classifier(self.features(x).flatten(1))  # (B, 10) logits


class DeployableModel(nn.Module):
    """Raw pixels in [0, 1] (B, 1, 28, 28) -> class probabilities (B, 10).

    With `tta`, the probabilities are averaged over the image and its 1-pixel shifts.
    """

    def __init__(self, net: nn.Module, mean: float, std: float, tta: bool = False) -> None:
        super().__init__()
        self.net = net
        self.tta = tta
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        if not self.tta:
            return torch.softmax(self.net(x), dim=1)
        views = shifted_views(x)
        return torch.stack([torch.softmax(self.net(v), dim=1) for v in views]).mean(0)


class EnsembleModel(nn.Module):
    """Averages the class probabilities of several deployable models (same input, output)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
