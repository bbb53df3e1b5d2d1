"""`mnist-pipeline`'s start-up: the registry commands (models, promote, rollback, history) load
neither torch nor the model code, so that each answers in a few seconds."""

from __future__ import annotations

import os
import subprocess
import sys

from .conftest import CLI


def test_registry_commands_start_without_torch():
    probe = ("import sys\nimport mnist_pipeline.cli as cli\n"
             "cli.parser().parse_args(['models', '--json'])\n"
             "print(sorted(m for m in ('torch', 'mnist_pipeline.model') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_bad_params_yaml_stops_a_command_with_one_line_naming_the_key(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  lr: fast\n")
    done = subprocess.run([CLI, "models"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip() == ("error: params: train.lr: expected a number > 0 and <= 10, "
                                   "got 'fast'")
    assert not (tmp_path / "mlruns").exists()  # stopped before touching a store


def test_registry_commands_outside_a_project_name_the_missing_store(tmp_path):
    for command in (["models"], ["history"], ["predict", "--model", "models:/m@a", "x.png"]):
        done = subprocess.run([CLI, *command], capture_output=True, text=True, timeout=120,
                              cwd=tmp_path, env={k: v for k, v in os.environ.items()
                                                 if not k.startswith(("MLFLOW_", "DVC_"))})
        assert done.returncode == 1, done.stderr
        assert done.stderr.strip().startswith(
            f"error: no MLflow store at {tmp_path.resolve()}/mlruns/mlflow.db: run this in "
            "the project's folder"), done.stderr
        assert not (tmp_path / "mlruns").exists()  # and no empty store made there


def test_commands_in_a_subfolder_use_the_projects_params_and_store(tmp_path):
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "params.yaml").write_text("train:\n  registered_model: digits\n")
    inside = tmp_path / "src"
    inside.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    done = subprocess.run([CLI, "models"], capture_output=True, text=True, timeout=120,
                          cwd=inside, env=env)
    assert done.returncode == 1
    assert f"no MLflow store at {tmp_path.resolve()}/mlruns/mlflow.db" in done.stderr
    (tmp_path / "params.yaml").write_text("train:\n  lr: fast\n")
    done = subprocess.run([CLI, "models"], capture_output=True, text=True, timeout=120,
                          cwd=inside, env=env)
    assert "error: params: train.lr" in done.stderr  # the project's params.yaml was read
