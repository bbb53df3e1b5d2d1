"""`mnist-pipeline`'s start-up: the registry commands (models, promote, rollback, history) load
neither torch nor the model code, so that each answers in a few seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import CLI, ROOT, clean_env


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


def test_the_note_on_a_better_version_skips_the_champion_and_heeds_the_floor():
    from mnist_pipeline.cli import better_note

    better = [(1, 0.9960), (3, 0.9950), (4, 0.9900)]
    assert better_note(5, better, holder=1, floor=0.995) == (
        "Note: version 3 has a higher test accuracy (99.5000%) than version 5. To promote "
        "it: mnist-pipeline promote --version 3")
    assert better_note(5, better, holder=None, floor=0.995).startswith("Note: version 1 ")
    assert "It is below the floor 99.9500% too: promote refuses it without --force " \
        "(mnist-pipeline promote --version 3 --force --reason ...)" in better_note(
            5, better, holder=1, floor=0.9995)
    assert better_note(5, [(1, 0.9960)], holder=1, floor=0.995) is None
    assert better_note(5, [], holder=None, floor=0.995) is None


def test_relative_default_paths_are_the_projects_from_a_subfolder(tmp_path, monkeypatch):
    from mnist_pipeline.cli import _in_project

    (tmp_path / ".dvc").mkdir()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "run.json").write_text("{}")
    (tmp_path / "src").mkdir()
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(tmp_path / "src")
    assert _in_project(Path("models/run.json")) == tmp_path.resolve() / "models" / "run.json"
    (tmp_path / "src" / "models").mkdir()
    (tmp_path / "src" / "models" / "run.json").write_text("{}")  # here first
    assert _in_project(Path("models/run.json")) == Path("models/run.json")


def test_models_names_recipes_from_the_projects_recipes_folder_in_a_subfolder(tmp_path):
    """`models` labels each version with the recipe of its run's params, read from the
    project's recipes/ (not this checkout's, nor the working folder's) wherever in the
    project it runs."""
    from mlflow import MlflowClient

    (tmp_path / ".dvc").mkdir()
    (tmp_path / "recipes").mkdir()
    reference = (ROOT / "recipes" / "reference.yaml").read_text()
    (tmp_path / "recipes" / "faithful.yaml").write_text(reference)  # a name only here
    (tmp_path / "recipes" / "three.yaml").write_text("train:\n  epochs: 3\n")
    (tmp_path / "mlruns").mkdir()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiment = client.create_experiment("mnist", artifact_location=(tmp_path / "a").as_uri())
    client.create_registered_model("mnist-cnn")
    faithful = yaml.safe_load(reference)["train"]
    for params in ({k: str(v) for k, v in faithful.items()}, {"epochs": "3"}, {"epochs": "4"}):
        run = client.create_run(experiment)
        for key, value in params.items():
            client.log_param(run.info.run_id, key, value)
        client.create_model_version("mnist-cnn", f"runs:/{run.info.run_id}/model",
                                    run.info.run_id)
    (tmp_path / "src").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    done = subprocess.run([CLI, "models", "--json"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path / "src", env=env)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["version"], r["recipe"]) for r in rows] == [(3, "custom"), (2, "three"),
                                                           (1, "faithful")]


def test_a_model_uri_that_cannot_be_loaded_is_one_message(tmp_path):
    """Whatever the URI's fault (a host with no server, a scheme without its package, a
    folder that is no model), predict says which model and why, in one line."""
    from mnist_pipeline.registry import RegistryError, load_pyfunc

    for uri in ("http://127.0.0.1:1/no-model", f"file://{tmp_path}", str(tmp_path / "none")):
        with pytest.raises(RegistryError, match=f"cannot load model {uri}: "):
            load_pyfunc(uri)


def test_names_mlflow_would_refuse_are_refused_before_the_store_is_opened(tmp_path):
    for command in (["promote", "--alias", "latest"], ["rollback", "--alias", "v2"],
                    ["promote", "--alias", "my alias"],
                    ["ensemble", "--versions", "1", "2", "--ensemble-name", "a.b"]):
        done = subprocess.run([CLI, *command], capture_output=True, text=True, timeout=120,
                              cwd=tmp_path, env=clean_env())
        named = "--ensemble-name" if "--ensemble-name" in command else "alias"
        assert done.returncode == 1 and done.stderr.startswith(
            f"error: {named} {command[-1]!r}: "), done.stderr
        assert "Traceback" not in done.stderr
