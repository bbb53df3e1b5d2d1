"""The reference training loop exactly as the blog post publishes it, for the benchmark only.

torchvision's MNIST dataset with ToTensor + Normalize, a shuffling DataLoader (batch 100,
drop_last), the post's CNN class (`CNN`: the same function as the project's MnistCNN, in the
post's layer order), Adam (lr 0.001) and ReduceLROnPlateau stepped once an epoch on the last
batch's loss; the per-image Python work is the point of comparison. Needs only torch and
torchvision (the GPU machine has no mlflow, dvc or PyYAML).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

LEARNING_RATE = 0.001


class CNN(nn.Module):
    """The post's network class as published: Conv-BN-ReLU blocks with the ReLU (not in place)
    before each max-pool, then the classifier. Only the post's `view(batch_size, -1)`, which
    breaks on a batch of another size or a channels-last tensor, is `flatten(1)`.

    The project's MnistCNN is the same function with the same parameters (in the same order,
    under other names); tests/test_model.py checks them bit for bit against each other."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(2, 2),
        )
        self.fc_layer = nn.Sequential(
            nn.Linear(64 * 7 * 7, 128), nn.BatchNorm1d(128), nn.ReLU(),
            nn.Linear(128, 64), nn.BatchNorm1d(64), nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(x)
        out = out.flatten(1)
        return self.fc_layer(out)


def link_torchvision_root(raw_dir: Path, root: Path) -> Path:
    """Lay `root` out as torchvision.datasets.MNIST expects, linking to our IDX files."""
    (root / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
    for f in Path(raw_dir).iterdir():
        link = root / "MNIST" / "raw" / f.name
        if not link.exists():
            os.symlink(f.resolve(), link)
    return root


def reference_loaders(
    raw_dir: Path, root: Path, batch_size: int = 100
) -> tuple[DataLoader, DataLoader]:
    """The published loaders over our IDX files (`root`: a scratch folder for the links)."""
    import torchvision.datasets as dset
    import torchvision.transforms as transforms

    link_torchvision_root(raw_dir, root)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    train = dset.MNIST(str(root), train=True, transform=tf, download=False)
    test = dset.MNIST(str(root), train=False, transform=tf, download=False)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True),
            DataLoader(test, batch_size=batch_size, shuffle=False, drop_last=True))


def reference_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
    device: torch.device, max_steps: int | None = None,
) -> tuple[float, int, float]:
    """One epoch as the reference runs it; returns (seconds, images, last batch's loss)."""
    model.train()
    loss_func = nn.CrossEntropyLoss()
    images = 0
    loss = torch.zeros(())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for step, (image, label) in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            break
        x, y = image.to(device), label.to(device)
        optimizer.zero_grad()
        loss = loss_func(model(x), y)
        loss.backward()
        optimizer.step()
        images += len(x)
    last_loss = loss.item()  # waits for the device, as the published print does
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, images, last_loss


@torch.no_grad()
def reference_accuracy(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    model.eval()
    correct = total = 0
    for image, label in loader:
        out = model(image.to(device))
        correct += int((out.argmax(1).cpu() == label).sum())
        total += len(label)
    return correct / total


def train_reference(
    loaders: tuple[DataLoader, DataLoader], device: torch.device, epochs: int,
    max_steps: int | None = None, seed: int = 0,
) -> dict[str, float]:
    """The published recipe for `epochs` epochs: training seconds, images, test accuracy."""
    torch.manual_seed(seed)
    model = CNN().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, threshold=0.1, patience=1, mode="min")
    seconds, images = 0.0, 0
    for _ in range(epochs):
        epoch_seconds, epoch_images, last_loss = reference_epoch(
            model, optimizer, loaders[0], device, max_steps)
        scheduler.step(last_loss)
        seconds += epoch_seconds
        images += epoch_images
    return {"seconds": seconds, "images": images,
            "test_accuracy": reference_accuracy(model, loaders[1], device)}
