"""The MLflow model registry: logging and registering trained models, and loading them back.

A logged model is `served_model.py` (checks of the input) around the network in the `pt2`
format (torch.export): a traced graph plus weights, loadable without pickle
(MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false), with a dynamic batch dimension.
"""

from __future__ import annotations

import copy
import json
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import PipelineError

if TYPE_CHECKING:  # torch is imported where it is used: `mnist-pipeline models` needs none
    from torch import nn

    from .model import DeployableModel

INPUT_SHAPE = (-1, 1, 28, 28)
WEIGHTS_FILE = "model.pt"  # the train stage's weights, logged under weights/


@dataclass(frozen=True)
class RegisteredModel:
    """Where a logged model lives: its run, its URIs and its registered version."""

    run_id: str
    model_uri: str
    registered_model: str
    version: int

    @property
    def registry_uri(self) -> str:
        return f"models:/{self.registered_model}/{self.version}"


def deployable(net: nn.Module, mean: float, std: float, tta: bool = False) -> DeployableModel:
    """A CPU, eval-mode copy of `net` that takes raw [0, 1] pixels and returns probabilities.

    Its convolution weights are channels-last, which the exported graph keeps: the activations
    then stay channels-last too, which a CPU runs faster than NCHW, with the same outputs up
    to rounding.
    """
    import torch

    from .model import DeployableModel

    net = copy.deepcopy(net).to("cpu").float().to(memory_format=torch.channels_last)
    return DeployableModel(net, mean, std, tta).eval()


def signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), INPUT_SHAPE)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]),
    )


def log_and_register(
    model: nn.Module, example: np.ndarray, registered_model: str, run_id: str
) -> RegisteredModel:
    """Log `model` to the active run and register it as a new version of `registered_model`.

    The logged model is `served_model.py` (input checks) around the network exported as an
    `mlflow.pytorch` pt2 model. `example` (float32, (B, 1, 28, 28), B > 1) is stored as the
    input example; a batch of more than one image keeps the graph's batch dimension dynamic.
    """
    import mlflow
    import torch

    if example.ndim != 4 or example.shape[0] < 2:
        raise ValueError("the input example must hold at least two images")
    example = example.astype(np.float32)
    requirements = [f"torch=={torch.__version__.split('+')[0]}", "numpy"]
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # torch.export's saver says this of every strided (channels-last) weight; it matters
        # only for weights that are not on the CPU, and a deployable model's all are.
        warnings.filterwarnings("ignore", message="No complete tensor found in the group")
        network = Path(tmp) / "network"
        mlflow.pytorch.save_model(model, network, serialization_format="pt2",
                                  signature=signature(), input_example=example,
                                  pip_requirements=requirements)
        info = mlflow.pyfunc.log_model(
            name=registered_model,  # the logged model's name: the registered one's
            python_model=str(Path(__file__).with_name("served_model.py")),
            artifacts={"network": str(network)},
            signature=signature(),
            input_example=example,
            registered_model_name=registered_model,
            pip_requirements=[*requirements, f"mlflow=={mlflow.__version__}"],
        )
    return RegisteredModel(
        run_id=run_id, model_uri=info.model_uri, registered_model=registered_model,
        version=int(info.registered_model_version),
    )


def load_pyfunc(uri: str) -> Any:
    """Load a logged or registered model (any MLflow model URI) for prediction."""
    import mlflow

    try:
        return mlflow.pyfunc.load_model(uri)
    except Exception as exc:  # any URI a user types: missing, malformed, unreachable, corrupt
        reason = str(exc).strip() or type(exc).__name__
        raise RegistryError(f"cannot load model {uri}: {reason}") from None


def tag_version(client: Any, name: str, version: int | str, tags: dict[str, Any]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))


def download_weights(client: Any, version: Any) -> Path:
    """The plain state_dict that the version's run logged (`weights/model.pt`), downloaded."""
    try:
        return Path(client.download_artifacts(version.run_id, f"weights/{WEIGHTS_FILE}"))
    except Exception as exc:
        raise RegistryError(f"version {version.version} of {version.name!r} has no weights "
                            f"artifact ({type(exc).__name__})") from None


# --- Promotion through aliases --------------------------------------------------------------
# MLflow keeps no history of alias moves, so each move is also recorded as a registered-model
# tag `promotion.NNNNNN` (JSON). Tags live in the tracking store, so the history is shared by
# everyone using the same store or server.

HISTORY_PREFIX = "promotion."


class RegistryError(PipelineError):
    """A registered model, version, run or alias that does not exist, or a refused move."""


def get_version(client: Any, name: str, version: int | str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        _registered(client, name)
        raise RegistryError(f"registered model {name!r} has no version {version}") from None


def _registered(client: Any, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException:
        store = getattr(client, "tracking_uri", None) or "this store"
        raise RegistryError(f"no registered model named {name!r} in {store}: train one there "
                            "(dvc repro), or copy another store's runs and models into it "
                            "(mnist-pipeline migrate --from URI)") from None


def check_run_info(client: Any, info: dict[str, Any], store: str, what: str) -> None:
    """Refuse `what` (a run's record of the version it registered: models/run.json) unless,
    in the store at `store`, that version is the one its run registered: version N of
    another store is another model. Run ids are unique, so this holds whatever URI reaches
    the store (127.0.0.1 on the server's machine, a host name elsewhere)."""
    from mlflow.exceptions import MlflowException

    name, version, run_id = info.get("registered_model"), info.get("version"), info.get("run_id")
    if name is None or version is None:
        return
    try:
        here = client.get_model_version(name, str(version)).run_id
    except MlflowException:
        here = None
    if here != run_id:
        where = info.get("tracking_uri") or "another store"
        found = ("has no such version" if here is None
                 else f"has a version {version} from run {here}")
        raise RegistryError(
            f"{what} names version {version} of {name!r}, registered by run {run_id} in "
            f"{where}; the store {store} {found}. Point MLFLOW_TRACKING_URI at {where}, or run "
            "train again")


def versions_of_experiments(client: Any, name: str, experiments: list[str]) -> list[int]:
    """The version of `name` that each DVC experiment registered (found through its run's
    DVC_EXP_NAME tag), in the order given; exactly one per experiment."""
    _registered(client, name)
    found: dict[str, list[int]] = {}
    for v in client.search_model_versions(f"name='{name}'"):
        experiment = client.get_run(v.run_id).data.tags.get("DVC_EXP_NAME")
        if experiment in experiments:
            found.setdefault(experiment, []).append(int(v.version))
    missing = [e for e in experiments if e not in found]
    if missing:
        raise RegistryError(f"no version of {name!r} was registered by experiment(s) "
                            f"{', '.join(missing)}: did they fail? (`dvc queue status`)")
    doubled = {e: sorted(v) for e, v in found.items() if len(v) > 1}
    if doubled:
        raise RegistryError(f"experiment(s) registered several versions of {name!r}: {doubled}; "
                            "name the versions with --versions")
    return [found[e][0] for e in experiments]


def version_for_run(client: Any, name: str, run_id: str) -> Any:
    """The version of `name` logged by `run_id`."""
    _registered(client, name)
    found = [v for v in client.search_model_versions(f"name='{name}'") if v.run_id == run_id]
    if not found:
        raise RegistryError(f"run {run_id} registered no version of {name!r}")
    return max(found, key=lambda v: int(v.version))


def champion(client: Any, name: str, alias: str) -> Any | None:
    """The version that `alias` points to, or None."""
    from mlflow.exceptions import MlflowException

    _registered(client, name)
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def accuracy_or_none(client: Any, version: Any) -> float | None:
    """The version's test accuracy as the evaluate stage measured it (its `test_accuracy`
    tag, else its run's `test_accuracy` metric), or None if it was never evaluated."""
    if "test_accuracy" in version.tags:
        return float(version.tags["test_accuracy"])
    metrics = client.get_run(version.run_id).data.metrics
    return float(metrics["test_accuracy"]) if "test_accuracy" in metrics else None


def accuracy_of(client: Any, version: Any) -> float:
    """`accuracy_or_none`, for decisions: a version never evaluated is refused."""
    accuracy = accuracy_or_none(client, version)
    if accuracy is None:
        raise RegistryError(f"version {version.version} of {version.name!r} has no "
                            "test_accuracy to judge it by: run the evaluate stage first")
    return accuracy


def history(client: Any, name: str) -> list[dict[str, Any]]:
    """Every alias move of `name`, oldest first."""
    tags = _registered(client, name).tags
    return [json.loads(tags[k]) for k in sorted(tags) if k.startswith(HISTORY_PREFIX)]


def _record(client: Any, name: str, entry: dict[str, Any]) -> None:
    key = f"{HISTORY_PREFIX}{len(history(client, name)) + 1:06d}"
    client.set_registered_model_tag(name, key, json.dumps(entry, sort_keys=True))


def gate(candidate: float, floor: float, current: float | None) -> str | None:
    """Why a candidate of accuracy `candidate` may not be promoted, or None if it may."""
    if candidate < floor:
        return (f"its test accuracy {candidate:.4%} is below the floor {floor:.4%} that "
                "promote.min_accuracy sets in params.yaml")
    if current is not None and candidate < current:
        return (f"its test accuracy {candidate:.4%} is below the current champion's "
                f"{current:.4%}")
    return None


def better_versions(client: Any, name: str, version: Any) -> list[tuple[int, float]]:
    """(version, accuracy) of the evaluated versions of `name` more accurate than `version`,
    best first."""
    mine = accuracy_or_none(client, version)
    found = []
    for v in client.search_model_versions(f"name='{name}'"):
        accuracy = accuracy_or_none(client, v)
        if accuracy is not None and (mine is None or accuracy > mine):
            found.append((int(v.version), accuracy))
    return sorted(found, key=lambda pair: (-pair[1], pair[0]))


def move_alias(
    client: Any, name: str, alias: str, version: Any, *, action: str, previous: Any | None,
    accuracy: float, reason: str, provenance: dict[str, str],
) -> dict[str, Any]:
    """Point `alias` at `version`, tag the version, and append the move to the history."""
    entry = {
        "action": action, "alias": alias, "version": int(version.version),
        "previous": int(previous.version) if previous is not None else None,
        "test_accuracy": accuracy, "reason": reason,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **provenance,
    }
    client.set_registered_model_alias(name, alias, version.version)
    for key, value in entry.items():
        if key not in {"alias", "version"}:
            client.set_model_version_tag(name, version.version, f"{alias}.{key}", str(value))
    _record(client, name, entry)
    describe(client, name, [version.version]
             + ([previous.version] if previous is not None else []))
    return entry


def promote(
    client: Any, name: str, alias: str, version: Any, floor: float, *, force: bool = False,
    reason: str = "", provenance: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Move `alias` to `version` if it passes the gate (or with force and a reason)."""
    if force and not reason.strip():
        raise RegistryError("--force needs a --reason, which is recorded with the promotion")
    accuracy = accuracy_of(client, version)
    current = champion(client, name, alias)
    if current is not None and current.version == version.version:
        raise RegistryError(f"version {version.version} is already {name}@{alias}")
    refusal = gate(accuracy, floor, accuracy_of(client, current) if current else None)
    if refusal and not force:
        raise RegistryError(f"version {version.version} of {name} was not promoted to "
                            f"@{alias}: {refusal}. Nothing was changed.")
    why = reason or "passed the gate"
    if refusal:
        why = f"forced past the gate ({refusal}): {reason}"
    return move_alias(client, name, alias, version, action="promote", previous=current,
                      accuracy=accuracy, reason=why, provenance=provenance or {})


def rollback(client: Any, name: str, alias: str, provenance: dict[str, str] | None = None,
             reason: str = "") -> dict[str, Any]:
    """Move `alias` back to the champion before the current one (replaying the history)."""
    stack: list[int] = []
    for entry in history(client, name):
        if entry["alias"] != alias:
            continue
        if entry["action"] == "promote":
            stack.append(entry["version"])
        elif entry["action"] == "rollback" and stack:
            stack.pop()
    if len(stack) < 2:
        raise RegistryError(f"{name}@{alias} has no earlier champion to roll back to")
    target = get_version(client, name, stack[-2])
    current = champion(client, name, alias)
    return move_alias(client, name, alias, target, action="rollback", previous=current,
                      accuracy=accuracy_of(client, target), reason=reason or "rollback",
                      provenance=provenance or {})


def list_versions(client: Any, name: str,
                  recipe_of: Callable[[dict[str, str]], str] | None = None
                  ) -> list[dict[str, Any]]:
    """Each version of `name`, newest first, with its aliases, accuracy, run (its name: the
    DVC experiment's), epochs and `recipe_of` its run's params."""
    rows = []
    # search results carry no aliases: take them from the registered model
    aliases: dict[str, list[str]] = {}
    for alias, version in _registered(client, name).aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    for v in sorted(client.search_model_versions(f"name='{name}'"),
                    key=lambda v: -int(v.version)):
        try:
            run = client.get_run(v.run_id)
            run_name, params = run.info.run_name, run.data.params
        except Exception:  # the run was deleted: the version is still listed
            run_name, params = None, {}
        rows.append({"version": int(v.version), "aliases": sorted(aliases.get(str(v.version), [])),
                     "test_accuracy": accuracy_or_none(client, v), "run_id": v.run_id,
                     "run_name": run_name, "epochs": params.get("epochs"),
                     "recipe": recipe_of(params) if params and recipe_of else None,
                     "created": datetime.fromtimestamp(v.creation_timestamp / 1000,
                                                       timezone.utc).isoformat(timespec="seconds")})
    return rows


# --- Descriptions: what the MLflow UI shows on the model and version pages -------------------


def describe_version(client: Any, version: Any) -> str:
    """A version's description: its test scores, the run that trained it and its recipe,
    and its aliases with why they point at it (from the version's tags and run)."""
    tags = version.tags
    lines = []
    if "test_accuracy" in tags:
        lines.append(f"Test accuracy {float(tags['test_accuracy']):.2%} (loss "
                     f"{float(tags['test_loss']):.4f}, macro F1 {float(tags['macro_f1']):.4f}).")
    else:
        lines.append("Not evaluated yet: the evaluate stage scores it.")
    try:
        run = client.get_run(version.run_id)
        note = run.data.tags.get("mlflow.note.content", "").splitlines()
        lines.append(f"Trained by run {run.info.run_name} ({version.run_id[:8]})"
                     + (f": {note[0]}" if note else "."))
    except Exception:  # a run deleted from the store: the version still describes itself
        lines.append(f"Trained by run {version.run_id}.")
    for alias in sorted(getattr(version, "aliases", None) or []):
        if f"{alias}.time" in tags:
            lines.append(f"@{alias} since {tags[f'{alias}.time']}: {tags[f'{alias}.reason']}.")
    return "\n\n".join(lines)


def describe_model(client: Any, name: str) -> str:
    """The registered model's description: where each alias points, and how to see more."""
    model = _registered(client, name)
    lines = []
    for alias, number in sorted(model.aliases.items()):
        version = client.get_model_version(name, str(number))
        accuracy = accuracy_or_none(client, version)
        lines.append(f"@{alias}: version {number} ({_pct(accuracy)} test accuracy), since "
                     f"{version.tags.get(f'{alias}.time', '?')}: "
                     f"{version.tags.get(f'{alias}.reason', '?')}.")
    if not lines:
        lines.append("No version is promoted yet: `mnist-pipeline promote`.")
    lines.append("Each version's description gives its scores, run and recipe. "
                 "`mnist-pipeline models` lists the versions; `mnist-pipeline history` every "
                 "alias move (also kept in this model's promotion.* tags).")
    return "\n\n".join(lines)


def _pct(accuracy: float | None) -> str:
    return f"{accuracy:.2%}" if accuracy is not None else "no"


def describe(client: Any, name: str, versions: list[Any]) -> None:
    """Rewrite the descriptions of `name` and of the given version numbers."""
    for number in versions:
        version = client.get_model_version(name, str(number))
        client.update_model_version(name, str(number), description=describe_version(client,
                                                                                     version))
    client.update_registered_model(name, description=describe_model(client, name))
