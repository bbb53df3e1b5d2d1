"""Promotion through registry aliases, rollback, history, and using the promoted model:
`mnist-pipeline promote|rollback|history|models|predict`, a real `mlflow server` and a real
`mlflow models serve`, all on the shared end-to-end pipeline run."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnist_pipeline.evaluate_stage import score_test_set

from .conftest import CLI, VENV_BIN, free_port, load_real, run, wait_for_http

pytestmark = pytest.mark.e2e


def test_promotion_below_the_floor_is_refused(promotions):
    refused = promotions["below_floor"]
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    accuracy = promotions["v1_report"]["test_accuracy"]
    assert "below the floor 99.9000%" in refused.stderr
    assert f"its test accuracy {accuracy:.4%}" in refused.stderr
    assert all(not json.loads(line)["aliases"]
               for line in promotions["models_before"].stdout.splitlines())


def test_promotion_with_a_lowered_floor(promotions, client, run_info):
    assert promotions["promote_v1"].returncode == 0, promotions["promote_v1"].stderr
    tags = promotions["tags_v1"]
    assert tags["champion.action"] == "promote" and tags["champion.previous"] == "None"
    assert len(tags["champion.git_commit"]) == 40 and tags["champion.time"]
    assert float(tags["champion.test_accuracy"]) == pytest.approx(float(tags["test_accuracy"]))


def test_worse_version_is_refused_then_forced_with_a_reason(promotions, run_info):
    worse = promotions["worse_refused"]
    assert worse.returncode == 1 and "below the current champion's" in worse.stderr
    assert promotions["force_without_reason"].returncode == 1
    assert "--reason" in promotions["force_without_reason"].stderr
    assert promotions["forced"].returncode == 0, promotions["forced"].stderr
    assert f"replacing version {run_info['version']}" in promotions["forced"].stdout
    # the more accurate version is the champion already: no note suggests promoting it
    assert "Note:" not in worse.stderr


def test_rollback_and_history(promotions, client, run_info):
    assert promotions["rollback"].returncode == 0, promotions["rollback"].stderr
    v1 = run_info["version"]
    # the second rollback has nothing earlier than v1 to go to
    assert promotions["rollback_again"].returncode == 1
    assert "no earlier champion" in promotions["rollback_again"].stderr
    assert str(client.get_model_version_by_alias("mnist-cnn", "champion").version) == str(v1)
    history = [json.loads(line) for line in promotions["history"].stdout.splitlines()]
    assert [(h["action"], h["version"], h["previous"]) for h in history] == [
        ("promote", v1, None), ("promote", v1 + 1, v1), ("rollback", v1, v1 + 1)]
    assert "testing a forced promotion" in history[1]["reason"]
    assert "forced past the gate" in history[1]["reason"]
    models = {json.loads(line)["version"]: json.loads(line)
              for line in promotions["models"].stdout.splitlines()}
    assert models[v1]["aliases"] == ["champion"] and models[v1 + 1]["aliases"] == []
    assert models[v1 + 1]["test_accuracy"] < models[v1]["test_accuracy"]
    # each version names its run (the DVC experiment), epochs and recipe
    for number in (v1, v1 + 1):
        run_ = client.get_run(models[number]["run_id"])
        assert models[number]["run_name"] == run_.data.tags["DVC_EXP_NAME"]
        assert models[number]["epochs"] == run_.data.params["epochs"]
        assert models[number]["recipe"] == "custom"  # -S overrides match no recipe file
        assert models[number]["run_name"] in promotions["models_table"].stdout
    assert "run (DVC experiment)" in promotions["models_table"].stdout

    # the registry's pages tell the story in words, kept current by promote and rollback
    model = client.get_registered_model("mnist-cnn")
    assert model.description.startswith(f"@champion: version {v1} (")
    champion_text = client.get_model_version("mnist-cnn", str(v1)).description
    other_text = client.get_model_version("mnist-cnn", str(v1 + 1)).description
    assert champion_text.startswith("Test accuracy ") and "@champion since" in champion_text
    assert "rollback" in champion_text and "@champion" not in other_text
    assert f"Trained by run {models[v1 + 1]['run_name']}" in other_text


@pytest.mark.parametrize("step, message", [
    ("unknown_version", "has no version 99"),
    ("unknown_run", "registered no version"),
    ("unknown_model", "no registered model named 'no-such-model' in sqlite:///"),
])
def test_bad_names_give_clear_errors(promotions, step, message):
    done = promotions[step]
    assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr


@pytest.fixture(scope="session")
def digit_files(tmp_path_factory):
    """Real test digits as PNG/JPEG files of other sizes and both polarities, plus bad files."""
    folder = tmp_path_factory.mktemp("digits")
    images, labels = load_real("t10k", 12)
    files, expected = [], []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        variants = {
            f"{i}-plain.png": Image.fromarray(image),
            f"{i}-big-inverted.png": Image.fromarray(255 - image).resize((140, 140)),
            f"{i}-rgb.jpg": Image.fromarray(255 - image).convert("RGB").resize((64, 90)),
        }
        for name, im in variants.items():
            im.save(folder / name)
            files.append(folder / name)
            expected.append(int(label))
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    Image.new("L", (28, 28), 255).save(folder / "blank.png")  # no digit: none is made up
    return files, expected, [folder / "empty.png", folder / "notes.txt", folder / "blank.png"]


def test_predict_real_digits_and_report_bad_files(pipeline, promotions, digit_files):
    repo, env, _ = pipeline
    files, expected, bad = digit_files
    done = run([CLI, "predict", "--json", *map(str, files), *map(str, bad)], repo, env,
               check=False)
    assert done.returncode == 1  # some files failed
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["file"] for r in rows] == [str(f) for f in [*files, *bad]]
    good, errors = rows[: len(files)], rows[len(files):]
    predicted = [r["digit"] for r in good]
    assert sum(p == e for p, e in zip(predicted, expected, strict=True)) >= len(files) - 1
    assert all(0.0 < r["probability"] <= 1.0 for r in good)
    assert all("error" in r and r["file"] in r["error"] for r in errors)
    assert "no digit found" in errors[-1]["error"]
    plain = run([CLI, "predict", str(files[0])], repo, env).stdout
    assert plain.startswith(f"{files[0]}: {expected[0]} (")
    text = run([CLI, "predict", str(bad[-1])], repo, env, check=False).stdout
    assert text == f"{bad[-1]}: error: no digit found (the image is blank: nothing stands " \
        "out from its background)\n"  # the file named once


def _popen(cmd: list[str], repo: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    import os
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_mlflow_server_answers_rest_queries(pipeline, promotions, run_info):
    repo, env, _ = pipeline
    port = free_port()
    server = _popen([str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                     str(port), "--workers", "1",
                     "--backend-store-uri", f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}",
                     "--default-artifact-root", (repo / "mlruns" / "artifacts").as_uri()],
                    repo, env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base}/health", server)
        history = _get(f"{base}/api/2.0/mlflow/metrics/get-history?"
                       f"run_id={run_info['run_id']}&metric_key=epoch%2Ftrain_loss")
        assert [m["step"] for m in history["metrics"]] == [1]
        alias = _get(f"{base}/api/2.0/mlflow/registered-models/alias?"
                     "name=mnist-cnn&alias=champion")
        assert alias["model_version"]["version"] == str(run_info["version"])
    finally:
        _stop(server)


def _post(url: str, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _readme_request() -> str:
    """The README's copy-paste request: the bash block that posts digit.json."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = readme.split("```bash\n")
    return next(b.split("```")[0] for b in blocks if "-d @digit.json" in b)


def test_mlflow_models_serve_predicts_and_refuses_bad_input(pipeline, promotions):
    repo, env, _ = pipeline
    port = free_port()
    serve_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}"}
    server = _popen([str(VENV_BIN / "mlflow"), "models", "serve", "-m",
                     "models:/mnist-cnn@champion", "--env-manager", "local",
                     "-h", "127.0.0.1", "-p", str(port)], repo, serve_env)
    url = f"http://127.0.0.1:{port}/invocations"
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, timeout=180)
        images, labels = load_real("t10k", 20)
        pixels = images[:, None] / 255.0
        status, body = _post(url, json.dumps({"inputs": pixels.tolist()}).encode())
        assert status == 200
        predictions = np.array(json.loads(body)["predictions"])
        assert predictions.shape == (20, 10)
        assert (predictions.argmax(1) == labels).mean() >= 0.95

        # what a user gets wrong is refused in one short sentence, not echoed back
        nan = pixels[:2].copy()
        nan[1, 0, 5, 5] = np.nan
        wrong = {"8-bit": (images[:2, None].astype(float).tolist(), "must lie in [0, 1]"),
                 "NaN": (nan.tolist(), "must be finite"),
                 "shape": (images[:2].reshape(2, 784).tolist(), "expected shape (-1, 1, 28, 28)")}
        for case, (inputs, message) in wrong.items():
            status, body = _post(url, json.dumps({"inputs": inputs}).encode())
            assert status == 400, case
            assert len(body) < 1024, (case, len(body))
            assert message in json.loads(body)["message"], (case, body)

        # the README's request, as a user pastes it (the port is the test's)
        script = _readme_request().replace("127.0.0.1:5001", f"127.0.0.1:{port}")
        done = run(["bash", "-c", script], repo, env)
        answer = json.loads(done.stdout)["predictions"]
        assert int(np.argmax(answer[0])) == labels[0]
    finally:
        _stop(server)


def test_ensemble_of_two_versions_is_one_servable_model(pipeline, promotions, run_info,
                                                       digit_files):
    import mlflow

    repo, env, _ = pipeline
    v1 = run_info["version"]
    done = run([CLI, "ensemble", "--versions", str(v1), str(v1 + 1)], repo, env)
    assert "Registered models:/mnist-cnn-ensemble/1" in done.stdout

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    images, _ = load_real("t10k", 16)
    pixels = images[:, None].astype(np.float32) / 255.0
    members = [mlflow.pyfunc.load_model(f"models:/mnist-cnn/{v}").predict(pixels)
               for v in (v1, v1 + 1)]
    ensemble = mlflow.pyfunc.load_model("models:/mnist-cnn-ensemble/1").predict(pixels)
    np.testing.assert_allclose(ensemble, np.mean(members, axis=0), atol=1e-5)

    files, _, _ = digit_files
    predicted = run([CLI, "predict", "--json", "--model", "models:/mnist-cnn-ensemble/1",
                     str(files[0])], repo, env)
    assert json.loads(predicted.stdout)["digit"] in range(10)
    listed = run([CLI, "models", "--name", "mnist-cnn-ensemble", "--json"], repo, env).stdout
    assert json.loads(listed.splitlines()[0])["test_accuracy"] > 0.5
    # its accuracy is that of the registered model, scored as the evaluate stage scores
    registered = mlflow.pyfunc.load_model("models:/mnist-cnn-ensemble/1")
    scored = score_test_set(registered, repo / "data" / "raw", 200).report
    version = mlflow.MlflowClient().get_model_version("mnist-cnn-ensemble", "1")
    assert float(version.tags["test_accuracy"]) == pytest.approx(scored["test_accuracy"])

    # --experiments: the versions that named DVC experiments registered (`make ensemble`)
    client = mlflow.MlflowClient()
    names = [client.get_run(client.get_model_version("mnist-cnn", str(v)).run_id)
             .data.tags["DVC_EXP_NAME"] for v in (v1, v1 + 1)]
    done = run([CLI, "ensemble", "--experiments", names[1], names[0],
                "--ensemble-name", "mnist-cnn-by-experiment"], repo, env)
    assert f"(members: v{v1 + 1} " in done.stdout and f", v{v1} " in done.stdout
    refused = run([CLI, "ensemble", "--experiments", names[0], "no-such-experiment"], repo, env,
                  check=False)
    assert refused.returncode != 0 and "no-such-experiment: did they fail?" in refused.stderr


@pytest.mark.parametrize("versions", [[3], [3, 3], [3, 4, 3]])
def test_an_ensemble_of_one_model_or_of_a_repeated_version_is_refused(versions):
    from mnist_pipeline.ensemble import build_ensemble
    from mnist_pipeline.registry import RegistryError

    with pytest.raises(RegistryError, match="at least two versions|may be named once"):
        build_ensemble(None, "mnist-cnn", versions, "mnist-cnn-ensemble", Path("none"), 200)
