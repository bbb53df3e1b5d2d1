"""Data augmentation on the training device: small random affine warps of whole batches.

Shifts, rotations and scaling (never flips: a flipped digit is another digit), drawn from a
seeded generator so that runs stay reproducible, applied with one `grid_sample` per batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_affine(
    x: torch.Tensor, generator: torch.Generator, shift: float = 2.0, rotate: float = 10.0,
    scale: float = 0.1,
) -> torch.Tensor:
    """Warp each image of x (B, C, H, W) by its own random shift (pixels), rotation (degrees)
    and scale (fraction); the border value (the background) fills what comes into view."""
    b, _, h, w = x.shape

    def uniform(*shape: int) -> torch.Tensor:  # in [-1, 1), drawn on the CPU generator
        return (torch.rand(*shape, generator=generator) * 2 - 1).to(x.device)

    angle = uniform(b) * math.radians(rotate)
    zoom = 1 + uniform(b) * scale
    offset = uniform(b, 2) * shift * 2 / torch.tensor([w, h], device=x.device)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, offset[:, 0]], 1),
                         torch.stack([sin, cos, offset[:, 1]], 1)], 1)  # (B, 2, 3)
    # F.affine_grid does the same through a batched matmul that is much slower on a CPU:
    # each source coordinate is affine in the output pixel's (x, y)
    ys = (torch.arange(h, device=x.device) * 2 + 1) / h - 1  # align_corners=False
    xs = (torch.arange(w, device=x.device) * 2 + 1) / w - 1

    def coordinate(row: int) -> torch.Tensor:  # (B, H, W)
        a, b, c = (theta[:, row, k, None, None] for k in range(3))
        return a * xs[None, None, :] + b * ys[None, :, None] + c

    grid = torch.stack([coordinate(0), coordinate(1)], -1)  # (B, H, W, 2)
    return F.grid_sample(x, grid.to(x.dtype), padding_mode="border", align_corners=False)


def shifted_views(x: torch.Tensor, pixels: int = 1) -> list[torch.Tensor]:
    """x and its copies shifted by `pixels` up, down, left and right (for test-time
    augmentation); `roll` keeps the graph exportable and the border is background anyway."""
    views = [x]
    for dims, step in (((2,), pixels), ((2,), -pixels), ((3,), pixels), ((3,), -pixels)):
        views.append(torch.roll(x, shifts=step, dims=dims))
    return views
