"""An exponential moving average of a model's weights: the network a run exports."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightEMA:
    """An exponential moving average of a model's weights and buffers (BN statistics too),
    updated in place with one fused call per step. The decay warms up as (1 + n) / (10 + n)
    so that the average follows the fast early changes instead of the random init."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values(),
                         strict=True))
        self._float = [(a, b) for a, b in pairs if a.is_floating_point()]
        self._other = [(a, b) for a, b in pairs if not a.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        dst, src = zip(*self._float, strict=True)
        torch._foreach_lerp_(list(dst), list(src), 1.0 - decay)
        for a, b in self._other:  # e.g. BatchNorm's num_batches_tracked
            a.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
