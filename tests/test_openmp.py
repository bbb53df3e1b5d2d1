"""The OpenMP wait policy the train stage applies before torch loads (openmp.py)."""

from __future__ import annotations

import subprocess
import sys

from mnist_pipeline import openmp

from .conftest import ROOT


def test_a_short_spin_unless_the_user_chose():
    assert openmp.wait_policy({}) == {"GOMP_SPINCOUNT": openmp.SPINCOUNT}
    assert openmp.wait_policy({"GOMP_SPINCOUNT": "0"}) == {}
    assert openmp.wait_policy({"OMP_WAIT_POLICY": "active"}) == {}
    assert openmp.describe({"GOMP_SPINCOUNT": "1000"}) == "GOMP_SPINCOUNT=1000"
    assert openmp.describe({}) == "libgomp default"


def test_the_train_stage_sets_it_before_torch_loads():
    """Importing the stage script: the variable is in the environment, and torch (whose
    libgomp reads it when it loads) came after."""
    code = ("import os, sys; sys.path[:0] = ['src', 'stages']; import train; "
            "print(os.environ.get('GOMP_SPINCOUNT'))")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == openmp.SPINCOUNT
    imported = [line.split("|")[-1].strip() for line in done.stderr.splitlines()
                if line.startswith("import time:")]
    assert imported.index("mnist_pipeline.openmp") < imported.index("torch")
