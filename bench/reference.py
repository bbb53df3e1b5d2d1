"""The reference training loop exactly as the blog post publishes it, for the benchmark only.

torchvision's MNIST dataset with ToTensor + Normalize, a shuffling DataLoader (batch 100,
drop_last), the same CNN and Adam; the per-image Python work is the point of comparison.
Needs only torch and torchvision (the GPU machine has no mlflow or dvc).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader


def torchvision_root(raw_dir: Path) -> Path:
    """A folder laid out as torchvision.datasets.MNIST expects, linking to our IDX files."""
    root = Path(tempfile.mkdtemp(prefix="mnist-tv-"))
    (root / "MNIST" / "raw").mkdir(parents=True)
    for f in raw_dir.iterdir():
        os.symlink(f.resolve(), root / "MNIST" / "raw" / f.name)
    return root


def reference_loaders(raw_dir: Path, batch_size: int = 100) -> tuple[DataLoader, DataLoader]:
    import torchvision.datasets as dset
    import torchvision.transforms as transforms

    root = torchvision_root(raw_dir)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    train = dset.MNIST(str(root), train=True, transform=tf, download=False)
    test = dset.MNIST(str(root), train=False, transform=tf, download=False)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True),
            DataLoader(test, batch_size=batch_size, shuffle=False))


def reference_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                    device: torch.device, max_steps: int | None = None) -> tuple[float, int]:
    """One epoch as the reference runs it; returns (seconds, images)."""
    model.train()
    loss_func = nn.CrossEntropyLoss()
    images = 0
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
    loss.item()  # wait for the device
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, images


@torch.no_grad()
def reference_accuracy(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    model.eval()
    correct = total = 0
    for image, label in loader:
        out = model(image.to(device))
        correct += int((out.argmax(1).cpu() == label).sum())
        total += len(label)
    return correct / total
