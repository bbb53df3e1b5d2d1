"""`mnist-pipeline migrate`: a local store (two runs, metric histories, artifacts, a dataset,
a logged and registered model with an alias) copied into the session's tracking server through
its proxy, then copied again, which adds nothing."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from mnist_pipeline.model import MnistCNN
from mnist_pipeline.registry import deployable, load_pyfunc, log_and_register
from mnist_pipeline.tracking import MlflowTracker, store_client

from .conftest import CLI, clean_env, run

pytestmark = pytest.mark.e2e

# the session's server is shared with other tests: names of this test's own
SUFFIX = uuid.uuid4().hex[:8]
EXPERIMENT, NAME = f"migrate-{SUFFIX}", f"migrate-cnn-{SUFFIX}"
COPIED = "1 experiments, 2 runs, 1 logged models, 1 versions, 1 aliases copied"
NOTHING = "0 experiments, 0 runs, 0 logged models, 0 versions, 0 aliases copied; 2 runs were"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A local store as the pipeline writes it: mlruns/mlflow.db and mlruns/artifacts."""
    store = tmp_path_factory.mktemp("local") / "mlruns"
    uri = f"sqlite:///{store / 'mlflow.db'}"
    tracker = MlflowTracker(uri, EXPERIMENT, (store / "artifacts").as_uri())
    example = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    with tracker.run(run_name="trained", tags={"DVC_EXP_NAME": "exp-a",
                                               "mlflow.note.content": "a note"}):
        tracker.log_params({"epochs": 3, "lr": 0.01})
        for step in range(3):
            tracker.log_metrics({"loss": 1 / (step + 1), "val_accuracy": 0.5 + step / 10},
                                step=step)
        tracker.log_dict({"accuracy": 0.9}, "reports/evaluate.json")
        tracker.log_dataset(example.reshape(4, -1), np.arange(4), "mnist-train",
                            "file:///data/raw", "d1gest")
        log_and_register(deployable(MnistCNN(), 0.13, 0.31), example, NAME, tracker.run_id)
    with pytest.raises(RuntimeError), tracker.run(run_name="crashed"):
        tracker.log_metrics({"loss": 2.0}, step=0)
        raise RuntimeError("a failed run is copied too")
    client = store_client(uri)
    client.set_registered_model_alias(NAME, "champion", "1")
    client.set_model_version_tag(NAME, "1", "test_accuracy", "0.9")
    client.update_model_version(NAME, "1", description="the first version")
    client.set_registered_model_tag(NAME, "owner", "alice")
    client.update_registered_model(NAME, description="digits")
    expected = load_pyfunc(f"models:/{NAME}@champion").predict(example)
    return uri, client, example, expected


@pytest.fixture(scope="module")
def migrated(source, tracking_server, tmp_path_factory):
    """Both migrations' output, and a client of the server."""
    uri = source[0]
    cwd = tmp_path_factory.mktemp("migrate-cwd")
    env = tracking_server.env()
    first = run([CLI, "migrate", "--from", uri], cwd, env, timeout=300)
    second = run([CLI, "migrate", "--from", uri], cwd, env, timeout=300)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            if key.startswith("MLFLOW_"):
                patch.setenv(key, value)
        yield first, second, store_client(tracking_server.uri)


def _runs(client, experiment: str) -> dict[str, object]:
    found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return {r.data.tags.get("migrated_from_run", r.info.run_id): r for r in found}


def test_migrate_copies_once_and_says_what(migrated):
    first, second, client = migrated
    assert COPIED in first.stdout, first.stdout + first.stderr
    assert NOTHING in second.stdout, second.stdout + second.stderr
    assert len(_runs(client, EXPERIMENT)) == 2
    assert len(client.search_model_versions(f"name='{NAME}'")) == 1


def test_runs_keep_params_tags_metrics_datasets_and_times(source, migrated):
    before, after = _runs(source[1], EXPERIMENT), _runs(migrated[2], EXPERIMENT)
    assert before.keys() == after.keys()
    for run_id, old in before.items():
        new = after[run_id]
        assert new.info.run_id != run_id and new.data.tags["migrated_from_run"] == run_id
        for field in ("run_name", "status", "start_time", "end_time"):
            assert getattr(new.info, field) == getattr(old.info, field), field
        assert new.data.params == old.data.params
        assert {k: v for k, v in new.data.tags.items() if k != "migrated_from_run"} \
            == old.data.tags
        for key in old.data.metrics:
            assert _history(migrated[2], new.info.run_id, key) \
                == _history(source[1], run_id, key), key
        assert [d.dataset.digest for d in new.inputs.dataset_inputs] \
            == [d.dataset.digest for d in old.inputs.dataset_inputs]
    statuses = sorted(r.info.status for r in after.values())
    assert statuses == ["FAILED", "FINISHED"]
    assert after[_trained(before)].data.tags["mlflow.note.content"] == "a note"


def _trained(runs: dict) -> str:
    return next(k for k, r in runs.items() if r.info.run_name == "trained")


def _history(client, run_id: str, key: str) -> list[tuple[int, float, int]]:
    return sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key))


def test_artifacts_are_behind_the_proxy(source, migrated, tracking_server, tmp_path):
    before, after = _runs(source[1], EXPERIMENT), _runs(migrated[2], EXPERIMENT)
    new = after[_trained(before)]
    assert new.info.artifact_uri.startswith("mlflow-artifacts:/")
    fetched = migrated[2].download_artifacts(new.info.run_id, "reports/evaluate.json",
                                             str(tmp_path))
    assert Path(fetched).read_text() == '{\n  "accuracy": 0.9\n}'
    stored = list(tracking_server.artifacts_dir.rglob("reports/evaluate.json"))
    assert any(new.info.run_id in str(path) for path in stored)


def test_the_registered_version_loads_by_alias_and_predicts_the_same(source, migrated):
    _, old_client, example, expected = source
    client = migrated[2]
    version = client.get_model_version_by_alias(NAME, "champion")
    old = old_client.get_model_version(NAME, "1")
    assert (version.tags, version.description) == (old.tags, old.description)
    model = client.get_registered_model(NAME)
    assert (model.tags, model.description) == ({"owner": "alice"}, "digits")
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.source_run_id == version.run_id
    assert client.get_run(version.run_id).data.tags["migrated_from_run"] == old.run_id
    assert logged.artifact_location.startswith("mlflow-artifacts:/")
    loaded = load_pyfunc(f"models:/{NAME}@champion")
    assert loaded.metadata.model_id == logged.model_id
    np.testing.assert_array_equal(loaded.predict(example), expected)


def test_a_missing_or_same_store_is_refused(source, tmp_path):
    uri = source[0]
    missing = run([CLI, "migrate", "--from", f"sqlite:///{tmp_path / 'none.db'}"], tmp_path,
                  clean_env(), check=False)
    assert missing.returncode == 1 and "no MLflow store at" in missing.stderr
    same = run([CLI, "migrate", "--from", uri], tmp_path,
               clean_env(MLFLOW_TRACKING_URI=uri), check=False)
    assert same.returncode == 1 and "is the target store itself" in same.stderr
    assert "Traceback" not in missing.stderr + same.stderr


def test_an_interrupted_copy_is_copied_again(source, tmp_path):
    """A run whose status was never set (its copy stopped half-way) and a logged model never
    finalized are deleted and copied again; nothing else is."""
    from mnist_pipeline.migrate import migrate

    uri, old_client = source[0], source[1]
    target = f"sqlite:///{tmp_path / 'mlflow.db'}"
    artifacts = (tmp_path / "artifacts").as_uri()
    assert COPIED in migrate(uri, target, artifacts).line()
    client = store_client(target)
    runs = _runs(client, EXPERIMENT)
    crashed = next(k for k, r in runs.items() if r.info.run_name == "crashed")
    client.update_run(runs[crashed].info.run_id, status="RUNNING")
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    model_id = old_client.get_model_version(NAME, "1").source.removeprefix("models:/")
    pending = client.create_logged_model(experiment, tags={"migrated_from_model": model_id})
    again = migrate(uri, target, artifacts).line()
    assert again.startswith("0 experiments, 1 runs, 0 logged models, 0 versions, 0 aliases")
    assert again.endswith("1 runs were already there")
    assert client.get_run(runs[crashed].info.run_id).info.lifecycle_stage == "deleted"
    assert pending.model_id not in {m.model_id for m in client.search_logged_models([experiment])}
    assert _runs(client, EXPERIMENT)[crashed].info.status == "FAILED"


def test_nested_runs_name_their_parents_copy(tmp_path):
    """Children linked to their parent's copy (wherever the parent comes in the copy order); a
    child whose parent went away is noted; a link lost to an interrupted migration is made
    again; a parent copied while running, then copied again once ended, takes its children
    along."""
    from mnist_pipeline.migrate import migrate

    uri = f"sqlite:///{tmp_path / 'source.db'}"
    client = store_client(uri)
    experiment = client.create_experiment("nested", (tmp_path / "source").as_uri())
    parent = client.create_run(experiment, run_name="sweep").info.run_id  # left running
    children = [client.create_run(experiment, run_name=f"trial-{i}",
                                  tags={"mlflow.parentRunId": parent}).info.run_id
                for i in range(2)]
    gone = client.create_run(experiment, run_name="gone").info.run_id
    orphan = client.create_run(experiment, run_name="orphan",
                               tags={"mlflow.parentRunId": gone}).info.run_id
    client.delete_run(gone)
    for run_id in [*children, orphan]:
        client.set_terminated(run_id)
    target, artifacts = f"sqlite:///{tmp_path / 'target.db'}", (tmp_path / "target").as_uri()
    copies = store_client(target)

    def linked() -> dict[str, str]:
        runs = _runs(copies, "nested")
        assert runs[orphan].data.tags["mlflow.parentRunId"] == gone
        return {child: runs[child].data.tags["mlflow.parentRunId"] for child in children}

    first = migrate(uri, target, artifacts)
    assert first.runs == 4
    assert first.notes == ["1 nested runs keep their source parent's id: the parent run was "
                           "not copied (deleted in the source)"]
    running_copy = _runs(copies, "nested")[parent].info.run_id
    assert linked() == dict.fromkeys(children, running_copy)

    # a link lost, as if a migration had stopped before linking: the source's id again
    copies.set_tag(_runs(copies, "nested")[children[0]].info.run_id, "mlflow.parentRunId",
                   parent)
    client.set_terminated(parent)  # the sweep ends: its copy is made again
    second = migrate(uri, target, artifacts)
    assert second.runs == 1 and second.skipped_runs == 3
    ended_copy = _runs(copies, "nested")[parent].info.run_id
    assert ended_copy != running_copy
    assert copies.get_run(running_copy).info.lifecycle_stage == "deleted"
    assert linked() == dict.fromkeys(children, ended_copy)
    third = migrate(uri, target, artifacts)
    assert third.runs == 0 and linked() == dict.fromkeys(children, ended_copy)


def test_the_scratch_folder_holds_one_run_at_a_time(source, tmp_path):
    """Each run's and logged model's files leave the scratch folder once uploaded."""
    from mnist_pipeline import migrate as module

    left: list[list[Path]] = []

    def emptied(copy):
        def spy(*args):
            new = copy(*args)
            left.append(list(args[-1].iterdir()))  # (the scratch folder)
            return new
        return spy

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "copy_run", emptied(module.copy_run))
        patch.setattr(module, "copy_logged_model", emptied(module.copy_logged_model))
        module.migrate(source[0], f"sqlite:///{tmp_path / 'target.db'}",
                       (tmp_path / "artifacts").as_uri())
    assert left == [[], [], []]  # two runs, one logged model
