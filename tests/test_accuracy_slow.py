"""The default recipe, in full, on the real pipeline: the accuracy it promises (slow: minutes)."""

from __future__ import annotations

import json

import pytest

from .conftest import clean_env, copy_project, mnist_mirror, run

pytestmark = pytest.mark.slow


def test_default_params_reach_the_reference_accuracy(tmp_path):
    env = clean_env(MNIST_MIRROR=str(mnist_mirror()))
    repo = copy_project(tmp_path / "repo", env)
    run(["dvc", "repro"], repo, env, timeout=3 * 3600)
    report = json.loads((repo / "metrics" / "evaluate.json").read_text())
    assert report["test_accuracy"] >= 0.995
