"""`mnist-pipeline`'s start-up: the registry commands (models, promote, rollback, history) load
neither torch nor the model code, so that each answers in a few seconds."""

from __future__ import annotations

import subprocess
import sys


def test_registry_commands_start_without_torch():
    probe = ("import sys\nimport mnist_pipeline.cli as cli\n"
             "cli.parser().parse_args(['models', '--json'])\n"
             "print(sorted(m for m in ('torch', 'mnist_pipeline.model') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
