"""Ensembles: several registered versions (e.g. one recipe trained with different seeds)
combined into one model that averages their probabilities, evaluated on the test set, logged
to MLflow and registered as one model that `predict` and `mlflow models serve` can use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import load_state_file
from .data import load_split
from .evaluate import scores
from .model import DeployableModel, EnsembleModel, MnistCNN
from .registry import RegistryError, _version, deployable, log_and_register, tag_version
from .tracking import MlflowTracker


def load_member(client: Any, name: str, version: int) -> tuple[DeployableModel, dict[str, Any]]:
    """A registered version rebuilt from its run's weights artifact and logged params."""
    import mlflow

    v = _version(client, name, version)
    params = client.get_run(v.run_id).data.params
    try:
        path = mlflow.artifacts.download_artifacts(run_id=v.run_id,
                                                   artifact_path="weights/model.pt")
    except Exception as exc:
        raise RegistryError(f"version {version} of {name!r} has no weights artifact to "
                            f"build an ensemble from ({type(exc).__name__})") from None
    net = MnistCNN()
    net.load_state_dict(load_state_file(Path(path)))
    member = deployable(net, float(params["stats.mean"]), float(params["stats.std"]),
                        tta=params.get("tta") == "True")
    return member, {"version": int(v.version), "run_id": v.run_id, "seed": params.get("seed")}


def probabilities(model: torch.nn.Module, images: np.ndarray, batch: int = 200) -> torch.Tensor:
    """`model`'s class probabilities for uint8 `images` (N, 28, 28), in batches (200 images
    keep a CPU's activations in cache: faster than larger batches)."""
    pixels = torch.from_numpy(images[:, None].astype(np.float32) / 255.0)
    with torch.no_grad():
        return torch.cat([model(pixels[i : i + batch]) for i in range(0, len(pixels), batch)])


def build_ensemble(
    tracker: MlflowTracker, name: str, versions: list[int], ensemble_name: str, raw_dir: Path,
) -> dict[str, Any]:
    """Evaluate the ensemble of `versions` of `name`, then log and register it."""
    if len(versions) < 2:
        raise RegistryError("an ensemble needs at least two versions")
    client = tracker.client()
    loaded = [load_member(client, name, v) for v in versions]
    members = [m for m, _ in loaded]
    images, labels = load_split(raw_dir, "test")
    member_probs = [probabilities(m, images) for m in members]
    member_acc = [scores(labels, p.numpy())["test_accuracy"] for p in member_probs]
    model = EnsembleModel(members).eval()
    # what `model` computes, from the members' outputs: each member runs once, not twice
    report = scores(labels, torch.stack(member_probs).mean(0).numpy())
    with tracker.run(run_name=f"ensemble of {name} v{','.join(map(str, versions))}"):
        tracker.log_params({"members": ",".join(map(str, versions)), "member_model": name,
                            "member_runs": ",".join(i["run_id"] for _, i in loaded)})
        tracker.log_metrics({"test_accuracy": report["test_accuracy"],
                             "test_loss": report["test_loss"], "macro_f1": report["macro_f1"],
                             **{f"member_{v}_test_accuracy": a
                                for v, a in zip(versions, member_acc, strict=True)}})
        example = images[:2, None].astype(np.float32) / 255.0
        registered = log_and_register(model, example, ensemble_name, tracker.run_id)
    tag_version(client, ensemble_name, registered.version, {
        "test_accuracy": report["test_accuracy"], "test_loss": report["test_loss"],
        "members": ",".join(f"{name}/{v}" for v in versions)})
    return {"registry_uri": registered.registry_uri, "run_id": registered.run_id,
            "test_accuracy": report["test_accuracy"], "member_accuracy": member_acc}
