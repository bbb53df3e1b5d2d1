"""The learning-rate schedules the `train` params name, at the edges of their ranges."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mnist_pipeline.optim import build_optimizer, build_schedulers
from mnist_pipeline.params import TrainParams


@pytest.mark.parametrize("steps, pct", [(4, 0.25), (2, 0.5), (100, 0.01), (1, 0.5), (8, 0.25),
                                        (10, 0.999), (3, 0.1)])
def test_onecycle_runs_every_step_of_short_runs(steps, pct):
    """OneCycleLR divides by zero when its warm-up is exactly one step (4 steps at 0.25):
    such a run warms up over none instead, and runs to its end at the annealed rate."""
    params = dataclasses.replace(TrainParams(), scheduler="onecycle", onecycle_pct=pct,
                                 epochs=1, lr=0.01)
    model = torch.nn.Linear(2, 1)
    optimizer = build_optimizer(params, model)
    _, scheduler = build_schedulers(params, optimizer, steps)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert max(rates) <= 0.01 + 1e-12 and rates[-1] < 1e-6  # the last batch's: annealed
    if steps * pct > 1:  # a real warm-up: it starts low and climbs
        assert rates[0] < 0.01 and max(rates) > rates[0]
