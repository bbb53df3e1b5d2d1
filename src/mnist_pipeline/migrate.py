"""Moving a local MLflow store into another one, e.g. the shared server.

    mnist-pipeline migrate --from sqlite:///path/to/mlruns/mlflow.db   # into $MLFLOW_TRACKING_URI

Copies experiments (matched by name), their runs (name, status, times, params, tags, full
metric histories, dataset inputs, artifacts), the logged models (`models:/m-<id>`, whose files
live beside the runs', not in them), and the registered models with their versions and aliases.
Each copied run and logged model is tagged with the id it came from, so a second migration
skips what the first one copied. A nested run's `mlflow.parentRunId` names its parent's copy.
Files pass through a scratch folder one run or model at a time.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PipelineError

MIGRATED_RUN = "migrated_from_run"
MIGRATED_MODEL = "migrated_from_model"
PARENT = "mlflow.parentRunId"  # MLflow's tag for a nested run's parent
METRICS_PER_BATCH = 1000  # MLflow's limits for one log_batch call
PARAMS_PER_BATCH = 100


class MigrationError(PipelineError):
    """The source store is missing, is not an MLflow store, or is the target itself."""


@dataclass
class Summary:
    """What one migration copied (what an earlier one had copied is not counted)."""

    experiments: int = 0
    runs: int = 0
    models: int = 0
    versions: int = 0
    aliases: int = 0
    skipped_runs: int = 0
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"{self.experiments} experiments, {self.runs} runs, {self.models} logged "
                f"models, {self.versions} versions, {self.aliases} aliases copied; "
                f"{self.skipped_runs} runs were already there")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (or of a plain path), else None."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).resolve()
    return None if "://" in uri else Path(uri).resolve()


def check_stores(source: str, target: str) -> str:
    """The source as a `sqlite:///` URI, after refusing a missing, foreign or same store."""
    path = sqlite_path(source)
    if path is None:
        raise MigrationError(f"--from takes a local store (sqlite:///path/to/mlflow.db), "
                             f"not {source}")
    if not path.is_file():
        raise MigrationError(f"no MLflow store at {path}")
    try:
        with sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    except sqlite3.DatabaseError as exc:
        raise MigrationError(f"{path} is not an SQLite database ({exc})") from None
    if not {"experiments", "runs", "alembic_version"} <= tables:
        raise MigrationError(f"{path} is not an MLflow store (no experiments or runs table)")
    if sqlite_path(target) == path:
        raise MigrationError(f"the source {path} is the target store itself: set "
                             "MLFLOW_TRACKING_URI to the store to copy into")
    return f"sqlite:///{path}"


def store(uri: str) -> Any:
    """A client for runs and registry both at `uri`."""
    from .tracking import open_client

    return open_client(uri, registry_uri=uri)


def pages(search: Callable[..., Any]) -> Iterator[Any]:
    """Every result of a paged MlflowClient search, `search(page_token=...)`."""
    token = None
    while True:
        page = search(page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def migrate(source: str, target: str, artifact_location: str | None = None) -> Summary:
    """Copy the store at `source` into the one at `target` (see the module docstring).
    `artifact_location` is given to experiments created in a target without its own."""
    import mlflow

    src, dst = store(source), store(target)
    summary = Summary()
    run_map: dict[str, str] = {}
    model_map: dict[str, str] = {}
    parents: dict[str, str] = {}  # target run -> its parent tag, for link_parents
    previous = mlflow.get_tracking_uri()
    # a local target's registry looks up `models:/m-<id>` sources in the default store
    mlflow.set_tracking_uri(target)
    try:
        with tempfile.TemporaryDirectory(prefix="mnist-migrate-") as tmp:
            scratch = Path(tmp)
            for experiment in pages(lambda page_token: src.search_experiments(
                    page_token=page_token)):
                experiment_id = copy_experiment(dst, experiment, artifact_location, summary)
                copy_runs(src, dst, experiment.experiment_id, experiment_id, run_map,
                          parents, scratch, summary)
                copy_logged_models(src, dst, experiment.experiment_id, experiment_id,
                                   run_map, model_map, scratch, summary)
            link_parents(dst, parents, run_map, summary)
            for model in pages(lambda page_token: src.search_registered_models(
                    page_token=page_token)):
                copy_registered_model(src, dst, model, run_map, model_map, summary)
    except mlflow.exceptions.MlflowException as exc:  # the target went away, refused a write
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise MigrationError(f"copying into {target} stopped ({first}); what was copied "
                             "stays, and running the command again copies the rest") from None
    finally:
        mlflow.set_tracking_uri(previous)
    return summary


def copy_experiment(dst: Any, experiment: Any, artifact_location: str | None,
                    summary: Summary) -> str:
    """The target's experiment of the same name, created (with the tags) if absent."""
    found = dst.get_experiment_by_name(experiment.name)
    if found is not None:
        if found.lifecycle_stage != "active":
            raise MigrationError(f"experiment {experiment.name!r} is deleted in the target "
                                 "store: restore it (`mlflow experiments restore`) first")
        return found.experiment_id
    summary.experiments += 1
    return dst.create_experiment(experiment.name, artifact_location=artifact_location,
                                 tags=dict(experiment.tags))


def migrated(dst: Any, experiment_id: str, tag: str) -> dict[str, Any]:
    """The target's runs of `experiment_id` tagged `tag`, by the source id the tag holds."""
    found = pages(lambda page_token: dst.search_runs(
        [experiment_id], filter_string=f"tags.{tag} LIKE '%'", page_token=page_token))
    return {run.data.tags[tag]: run for run in found}


def copy_runs(src: Any, dst: Any, src_experiment: str, experiment_id: str,
              run_map: dict[str, str], parents: dict[str, str], scratch: Path,
              summary: Summary) -> None:
    """Copy the experiment's runs that an earlier migration did not copy in full; note the
    parent tag of each copy (also of one copied earlier) in `parents`."""
    done = migrated(dst, experiment_id, MIGRATED_RUN)
    for run in pages(lambda page_token: src.search_runs([src_experiment],
                                                         page_token=page_token)):
        earlier = done.get(run.info.run_id)
        if earlier is not None and (earlier.info.status != "RUNNING"
                                    or run.info.status == "RUNNING"):
            run_map[run.info.run_id] = earlier.info.run_id
            if PARENT in earlier.data.tags:
                parents[earlier.info.run_id] = earlier.data.tags[PARENT]
            summary.skipped_runs += 1
            continue
        if earlier is not None:  # an interrupted copy (its status is set last): start again
            dst.delete_run(earlier.info.run_id)
        new = run_map[run.info.run_id] = copy_run(src, dst, run, experiment_id, scratch)
        if PARENT in run.data.tags:
            parents[new] = run.data.tags[PARENT]
        summary.runs += 1


def link_parents(dst: Any, parents: dict[str, str], run_map: dict[str, str],
                 summary: Summary) -> None:
    """Point each copied nested run at its parent's current copy: a parent may be copied
    after its children or in another experiment, an earlier migration may have stopped before
    linking, and a parent copied while it was running is copied again once it has ended."""
    copies, unlinked = set(run_map.values()), 0
    for run_id, parent in parents.items():
        if parent in copies:
            continue  # linked
        source = parent if parent in run_map else copied_from(dst, parent)
        if source in run_map:
            dst.set_tag(run_id, PARENT, run_map[source])
        elif source is None:
            unlinked += 1
    if unlinked:
        summary.notes.append(f"{unlinked} nested runs keep their source parent's id: the "
                             "parent run was not copied (deleted in the source)")


def copied_from(dst: Any, run_id: str) -> str | None:
    """The source id of the target's run `run_id` (also of a deleted copy), or None where
    the target has no such run or it is not a copy."""
    from mlflow.exceptions import MlflowException

    try:
        return dst.get_run(run_id).data.tags.get(MIGRATED_RUN)
    except MlflowException:
        return None


def copy_run(src: Any, dst: Any, run: Any, experiment_id: str, scratch: Path) -> str:
    """A copy of `run` in the target; its status and end time are set last."""
    from mlflow.entities import Metric, Param

    info, data = run.info, run.data
    new = dst.create_run(experiment_id, start_time=info.start_time, run_name=info.run_name,
                         tags={**data.tags, MIGRATED_RUN: info.run_id}).info.run_id
    params = [Param(k, v) for k, v in data.params.items()]
    for start in range(0, len(params), PARAMS_PER_BATCH):
        dst.log_batch(new, params=params[start:start + PARAMS_PER_BATCH])
    metrics = [Metric(m.key, m.value, m.timestamp, m.step)
               for key in data.metrics for m in src.get_metric_history(info.run_id, key)]
    for start in range(0, len(metrics), METRICS_PER_BATCH):
        dst.log_batch(new, metrics=metrics[start:start + METRICS_PER_BATCH])
    if run.inputs and run.inputs.dataset_inputs:
        dst.log_inputs(new, datasets=run.inputs.dataset_inputs)
    if src.list_artifacts(info.run_id):
        local = src.download_artifacts(info.run_id, "", str(scratch / info.run_id))
        dst.log_artifacts(new, local)
        shutil.rmtree(scratch / info.run_id)
    dst.set_terminated(new, status=info.status, end_time=info.end_time)
    return new


def copy_logged_models(src: Any, dst: Any, src_experiment: str, experiment_id: str,
                       run_map: dict[str, str], model_map: dict[str, str], scratch: Path,
                       summary: Summary) -> None:
    """Copy the experiment's finished logged models (`models:/m-<id>`), linked to the
    copies of their runs."""
    from mlflow.entities import LoggedModelStatus

    done = {}
    for model in pages(lambda page_token: dst.search_logged_models(
            [experiment_id], filter_string=f"tags.{MIGRATED_MODEL} LIKE '%'",
            page_token=page_token)):
        if model.status == LoggedModelStatus.READY:
            done[model.tags[MIGRATED_MODEL]] = model.model_id
        else:  # an interrupted upload (a model is finalized last): start again
            dst.delete_logged_model(model.model_id)
    for model in pages(lambda page_token: src.search_logged_models(
            [src_experiment], page_token=page_token)):
        if model.status != LoggedModelStatus.READY:
            continue
        if model.model_id in done:
            model_map[model.model_id] = done[model.model_id]
            continue
        model_map[model.model_id] = copy_logged_model(src, dst, model, experiment_id,
                                                      run_map, scratch)
        summary.models += 1


def copy_logged_model(src: Any, dst: Any, model: Any, experiment_id: str,
                      run_map: dict[str, str], scratch: Path) -> str:
    """A copy of a logged model and its files, its MLmodel naming the new ids."""
    import mlflow
    from mlflow.entities import LoggedModelOutput

    run_id = run_map.get(model.source_run_id or "")
    new = dst.create_logged_model(experiment_id, name=model.name, source_run_id=run_id,
                                  tags={**model.tags, MIGRATED_MODEL: model.model_id},
                                  params=dict(model.params), model_type=model.model_type)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location,
                                                     dst_path=str(scratch / model.model_id)))
    retarget_mlmodel(local / "MLmodel", new.model_id, run_id, new.artifact_location)
    dst.log_model_artifacts(new.model_id, str(local))
    shutil.rmtree(scratch / model.model_id)
    if run_id is not None:
        steps = [o.step for o in src.get_run(model.source_run_id).outputs.model_outputs
                 if o.model_id == model.model_id]
        dst.log_outputs(run_id, [LoggedModelOutput(new.model_id, steps[0] if steps else 0)])
    dst.finalize_logged_model(new.model_id, "READY")
    return new.model_id


def retarget_mlmodel(path: Path, model_id: str, run_id: str | None, location: str) -> None:
    """Point a copied MLmodel file at its new logged model and run (MLflow links what the
    loaded model does, e.g. traces, to the ids it names)."""
    if not path.is_file():
        return
    from mlflow.models import Model

    meta = Model.load(str(path))
    meta.model_id, meta.run_id, meta.artifact_path = model_id, run_id, location
    if getattr(meta, "model_uuid", None):
        meta.model_uuid = model_id
    meta.save(str(path))


def copy_registered_model(src: Any, dst: Any, model: Any, run_map: dict[str, str],
                          model_map: dict[str, str], summary: Summary) -> None:
    """The registered model (description, tags), the versions not yet in the target, then
    the aliases."""
    from mlflow.exceptions import MlflowException

    name = model.name
    try:
        there = dst.get_registered_model(name)
    except MlflowException:
        there = dst.create_registered_model(name, tags=dict(model.tags),
                                            description=model.description)
    for key, value in model.tags.items():  # an existing model keeps its own values
        if key not in there.tags:
            dst.set_registered_model_tag(name, key, value)
    if model.description and not there.description:
        dst.update_registered_model(name, description=model.description)
    versions = copy_versions(src, dst, name, run_map, model_map, summary)
    for alias, number in sorted(model.aliases.items()):
        copy_alias(dst, name, alias, versions.get(str(number)), there.aliases.get(alias),
                   set(versions.values()), summary)


def copy_versions(src: Any, dst: Any, name: str, run_map: dict[str, str],
                  model_map: dict[str, str], summary: Summary) -> dict[str, str]:
    """Source version number -> target version number, creating the versions not yet there
    (found by their source: the copied logged model or run)."""
    def versions(client: Any) -> list[Any]:
        found = pages(lambda page_token: client.search_model_versions(
            f"name='{name}'", page_token=page_token))
        return sorted(found, key=lambda v: int(v.version))

    existing: dict[str, list[str]] = {}
    for v in versions(dst):
        existing.setdefault(v.source, []).append(str(v.version))
    numbers: dict[str, str] = {}
    for v in versions(src):
        target = version_source(v, run_map, model_map)
        if target is None:
            summary.notes.append(f"{name} version {v.version}: its run or logged model was "
                                 "not copied (deleted?), so neither is it")
            continue
        source, model_id = target
        if existing.get(source):
            numbers[str(v.version)] = existing[source].pop(0)
            continue
        made = dst.create_model_version(name, source, run_id=run_map.get(v.run_id or ""),
                                        tags=dict(v.tags), description=v.description,
                                        model_id=model_id)
        numbers[str(v.version)] = str(made.version)
        summary.versions += 1
    return numbers


def version_source(version: Any, run_map: dict[str, str],
                   model_map: dict[str, str]) -> tuple[str, str | None] | None:
    """(source URI in the target, logged model id) for a source version, or None when what
    it points at was not copied."""
    source = version.source
    if source.startswith("models:/m-"):
        new = model_map.get(source.removeprefix("models:/").split("/")[0])
        return (f"models:/{new}", new) if new else None
    if source.startswith("runs:/"):
        run_id, _, rest = source.removeprefix("runs:/").partition("/")
        new = run_map.get(run_id)
        return (f"runs:/{new}/{rest}", None) if new else None
    return None


def copy_alias(dst: Any, name: str, alias: str, version: str | None, current: Any,
               migrated_versions: set[str], summary: Summary) -> None:
    """Point `alias` at the copied version, unless the target's alias points at one of its
    own versions (a migration does not take an alias from the target's users)."""
    if version is None or str(current) == version:
        return
    if current is not None and str(current) not in migrated_versions:
        summary.notes.append(f"{name}@{alias} stays at version {current} of the target (the "
                             f"source's is version {version} there: `mnist-pipeline promote "
                             f"--name {name} --version {version} --alias {alias}` moves it)")
        return
    dst.set_registered_model_alias(name, alias, version)
    summary.aliases += 1
