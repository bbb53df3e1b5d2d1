"""Ensembles: several registered versions (e.g. one recipe trained with different seeds)
combined into one model that averages their probabilities, logged to MLflow, registered, and
then evaluated through the registered model like any other version (`evaluate_stage`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checkpoint import load_state_file
from .data import load_split
from .evaluate_stage import evaluate_version
from .inference import to_pixels
from .model import DeployableModel, EnsembleModel, MnistCNN
from .registry import (
    RegistryError,
    accuracy_or_none,
    deployable,
    download_weights,
    get_version,
    log_and_register,
    tag_version,
)
from .tracking import MlflowTracker


def load_member(client: Any, name: str, version: int) -> tuple[DeployableModel, dict[str, Any]]:
    """A registered version rebuilt from its run's weights artifact and logged params, with
    what is known of it (version, run, seed, the evaluate stage's test accuracy)."""
    v = get_version(client, name, version)
    params = client.get_run(v.run_id).data.params
    net = MnistCNN()
    net.load_state_dict(load_state_file(download_weights(client, v)))
    member = deployable(net, float(params["stats.mean"]), float(params["stats.std"]),
                        tta=params.get("tta") == "True")
    return member, {"version": int(v.version), "run_id": v.run_id, "seed": params.get("seed"),
                    "test_accuracy": accuracy_or_none(client, v)}


def build_ensemble(
    tracker: MlflowTracker, name: str, versions: list[int], ensemble_name: str, raw_dir: Path,
    batch_size: int,
) -> dict[str, Any]:
    """Register the ensemble of `versions` of `name` as a new version of `ensemble_name`,
    then score that registered version on the test set."""
    if len(set(versions)) < 2:
        raise RegistryError("an ensemble needs at least two versions")
    if len(set(versions)) < len(versions):
        raise RegistryError(f"versions {', '.join(map(str, versions))}: each member may be "
                            "named once")
    client = tracker.client()
    loaded = [load_member(client, name, v) for v in versions]
    model = EnsembleModel([m for m, _ in loaded]).eval()
    example = to_pixels(load_split(raw_dir, "test")[0][:2])
    with tracker.run(run_name=f"ensemble of {name} v{','.join(map(str, versions))}"):
        tracker.log_params({"members": ",".join(map(str, versions)), "member_model": name,
                            "member_runs": ",".join(i["run_id"] for _, i in loaded)})
        registered = log_and_register(model, example, ensemble_name, tracker.run_id)
        tag_version(client, ensemble_name, registered.version,
                    {"members": ",".join(f"{name}/{v}" for v in versions)})
        result, _ = evaluate_version(tracker, ensemble_name, registered.version, raw_dir,
                                     batch_size)
    return {"registry_uri": registered.registry_uri, "run_id": registered.run_id,
            "test_accuracy": result.report["test_accuracy"],
            "member_accuracy": [info["test_accuracy"] for _, info in loaded]}
