"""What a person sees in the MLflow UI, in a real browser: `mlflow ui` on 127.0.0.1 over the
store of the shared end-to-end run (after the promotion lifecycle), driven by headless
Chromium through Selenium. Screenshots are saved under the test's temporary folder. Skips,
saying why, only where Chromium or its driver is not installed (`.ci/run` installs them)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import ROOT, VENV_BIN, clean_env, free_port, run, wait_for_http

pytestmark = pytest.mark.e2e
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser(tmp_path) -> Iterator:
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (CHROMIUM and DRIVER):
        pytest.skip("Chromium and chromedriver are not installed (apt-get install chromium "
                    "chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-sync",
                 "--disable-component-update", "--window-size=1600,1000",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def mlflow_ui(pipeline) -> Iterator[str]:
    repo, _, _ = pipeline
    store, port = repo / "mlruns", free_port()
    proc = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--default-artifact-root", str(store / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port)],
        cwd=repo, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _show(driver, url: str, text: str, shot: Path) -> str:
    """Open `url`, wait until `text` is on the page, save a screenshot; the page's text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    try:
        WebDriverWait(driver, 60).until(ec.text_to_be_present_in_element(
            (By.TAG_NAME, "body"), text))
    finally:
        driver.save_screenshot(str(shot))
    return driver.find_element(By.TAG_NAME, "body").text


def test_runs_models_and_descriptions_in_the_mlflow_ui(browser, mlflow_ui, promotions, client,
                                                        run_info, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    mlrun = client.get_run(run_info["run_id"])
    name, experiment = mlrun.info.run_name, mlrun.info.experiment_id
    assert name == mlrun.data.tags["DVC_EXP_NAME"]
    accuracy = mlrun.data.metrics["test_accuracy"]

    # the training view, as the README gives its address: the run under its DVC name
    runs = _show(browser, f"{mlflow_ui}/#/experiments/{experiment}?workflowType=machine_learning",
                 name, tmp_path / "runs.png")
    assert "Model training" in runs and "mnist-cnn" in runs
    # Columns -> test_accuracy, as the README says: the run's accuracy in the list
    WebDriverWait(browser, 30).until(ec.element_to_be_clickable(
        (By.XPATH, "//button[normalize-space(.)='Columns']"))).click()
    WebDriverWait(browser, 30).until(ec.element_to_be_clickable(
        (By.XPATH, "//*[text()='test_accuracy']"))).click()
    WebDriverWait(browser, 30).until(ec.text_to_be_present_in_element(
        (By.TAG_NAME, "body"), f"{accuracy:.4f}".rstrip("0")))
    browser.save_screenshot(str(tmp_path / "runs-with-accuracy.png"))

    # the run: its description, its dataset and its per-epoch curves
    overview = _show(browser, f"{mlflow_ui}/#/experiments/{experiment}/runs/{run_info['run_id']}",
                     "process(es)", tmp_path / "run.png")
    assert "mnist-train" in overview
    # the per-epoch curves first (the "epoch" section), in view without scrolling
    charts = _show(browser, f"{mlflow_ui}/#/experiments/{experiment}/runs/"
                   f"{run_info['run_id']}/model-metrics", "train_loss", tmp_path / "charts.png")
    first = charts.index("train_loss")
    assert "test_accuracy" not in charts or first < charts.index("test_accuracy")

    # the registry: the champion alias and the descriptions promote and rollback keep current
    champion = client.get_model_version_by_alias("mnist-cnn", "champion")
    model = _show(browser, f"{mlflow_ui}/#/models/mnist-cnn", "@champion: version",
                  tmp_path / "model.png")
    assert f"@champion: version {champion.version}" in model
    version = _show(browser, f"{mlflow_ui}/#/models/mnist-cnn/versions/{champion.version}",
                    "Test accuracy", tmp_path / "version.png")
    assert "champion" in version and "@champion since" in version
    assert f"Trained by run {client.get_run(champion.run_id).info.run_name}" in version
    assert all((tmp_path / f"{shot}.png").stat().st_size > 10_000
               for shot in ("runs", "runs-with-accuracy", "run", "charts", "model", "version"))


def test_dvc_plots_render_offline(browser, pipeline, tmp_path):
    """`dvc plots show`'s page, with the template `make install` writes (vega inline), opened
    with the network cut off: the image plots (curves, confusion matrix with counts,
    misclassified digits) load and every vega plot is drawn."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    template = ROOT / ".dvc" / "offline-plots.html"
    assert template.is_file(), f"{template} missing: `make install` writes it"
    repo, env, _ = pipeline
    # wired as `make install` wires it in a checkout, then the plain command
    shutil.copy(template, repo / ".dvc" / template.name)
    run(["dvc", "config", "--local", "plots.html_template", template.name], repo, env)
    run(["dvc", "plots", "show", "--out", "dvc_plots"], repo, env)
    page = (repo / "dvc_plots" / "index.html").read_text()
    assert "cdn.jsdelivr" not in page
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.emulateNetworkConditions", {
        "offline": True, "latency": 0, "downloadThroughput": 0, "uploadThroughput": 0})
    browser.get((repo / "dvc_plots" / "index.html").as_uri())
    images = {Path(img.get_attribute("src")).name: img
              for img in browser.find_elements(By.TAG_NAME, "img")}
    assert {name.rsplit("plots_", 1)[-1] for name in images} == {
        "train_curves.png", "confusion.png", "misclassified.png"}, list(images)
    for name, img in images.items():
        assert browser.execute_script("return arguments[0].complete && "
                                      "arguments[0].naturalWidth > 100", img), name

    # every vega plot: a drawn canvas with more than a few non-white pixels
    targets = re.findall(r"vegaEmbed\('#([^']+)'", page)
    assert len(targets) == 4, targets  # loss, accuracy, learning rate, confusion matrix
    WebDriverWait(browser, 30).until(lambda b: all(
        b.find_elements(By.CSS_SELECTOR, f"#{t} canvas") for t in targets))
    for target in targets:
        inked = browser.execute_script(_INKED, f"#{target} canvas")
        assert inked > 500, (target, inked)
    browser.save_screenshot(str(tmp_path / "dvc-plots-offline.png"))


# How many pixels of a canvas are not white (nor transparent).
_INKED = """
const c = document.querySelector(arguments[0]);
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let n = 0;
for (let i = 0; i < d.length; i += 4) {
  if (d[i + 3] > 0 && (d[i] < 200 || d[i + 1] < 200 || d[i + 2] < 200)) n++;
}
return n;
"""
