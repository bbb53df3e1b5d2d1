"""The layout and the docs keep their promises: MLflow behind three modules, no development
history in user-facing text, and every figure of README.md and bench/RESULTS.md generated from
the committed result files in bench/results/."""

from __future__ import annotations

import ast
import json
import re

import pytest

from .conftest import ROOT, load_script

USER_TEXT = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "bench").glob("*.md")), ROOT / "params.yaml",
             *sorted((ROOT / "recipes").glob("*.yaml")),
             *sorted((ROOT / "src" / "mnist_pipeline").rglob("*.py")),
             *sorted((ROOT / "stages").glob("*.py"))]


@pytest.fixture(scope="module")
def report():
    return load_script(ROOT / "bench" / "report.py")


def _imported(path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_only_tracking_registry_and_the_served_model_import_mlflow():
    importers = {p.name for p in (ROOT / "src" / "mnist_pipeline").glob("*.py")
                 if "mlflow" in _imported(p)}
    importers |= {f"stages/{p.name}" for p in (ROOT / "stages").glob("*.py")
                  if "mlflow" in _imported(p)}
    # served_model.py is not imported by the package: MLflow copies it into each logged model;
    # migrate.py copies whole stores, runs and registry together, through MLflow's client
    assert importers == {"tracking.py", "registry.py", "served_model.py", "migrate.py"}


def test_user_text_tells_no_development_history():
    pattern = re.compile(r"session [0-9]|sessions [0-9]|the team|was lent|not lent|"
                         r"shared/mnist|\.\./shared", re.IGNORECASE)
    allowed = {"README.md": {"shared/mnist"}}  # the one line on what CI uses
    found = []
    for path in USER_TEXT:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in pattern.findall(line):
                if match.lower() not in allowed.get(path.name, set()):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_readme_is_short_and_names_the_quick_start():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 220
    assert "export MNIST_MIRROR=/path/to/mnist-gz-folder" in text and "make test" in text
    assert text.count("shared/mnist") == 1


def test_results_md_is_what_report_py_prints(report):
    assert (ROOT / "bench" / "RESULTS.md").read_text() == report.report()


def test_readme_accuracy_table_is_the_generated_one(report):
    accuracy = json.loads((ROOT / "bench" / "results" / "accuracy.json").read_text())
    table = "\n".join(report.accuracy_table(accuracy))
    assert table in (ROOT / "README.md").read_text()


def test_make_report_rewrites_a_stale_readme_table(report, tmp_path, capsys):
    readme = (ROOT / "README.md").read_text()
    table = report.accuracy_table(json.loads(
        (ROOT / "bench" / "results" / "accuracy.json").read_text()))
    stale = tmp_path / "README.md"
    stale.write_text(readme.replace("\n".join(table[2:]), "| reference | 20 | 1 | 99.00% |"))
    assert stale.read_text() != readme
    assert report.main(["--readme", str(stale)]) == 0
    assert stale.read_text() == readme
    assert capsys.readouterr().out == report.report()  # RESULTS.md, as without --readme

    untabled = tmp_path / "other.md"
    untabled.write_text("# no table\n")
    assert report.main(["--readme", str(untabled)]) == 1
    assert "found 0" in capsys.readouterr().err and untabled.read_text() == "# no table\n"


def test_every_percentage_in_the_docs_comes_from_a_result_file(report):
    """A figure like 99.53% in README.md, docs/ or RESULTS.md is one report.py prints or one
    that a result file holds (as a fraction)."""
    generated = report.report()
    held = set()
    for path in (ROOT / "bench" / "results").glob("*.json"):
        _collect(json.loads(path.read_text()), held)
    for path in (ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "bench/RESULTS.md"):
        for figure in re.findall(r"\d+\.\d+%", path.read_text()):
            name = path.relative_to(ROOT)
            assert figure in generated or figure in held, f"{name}: {figure}"


def _collect(node, into: set[str]) -> None:
    if isinstance(node, dict):
        for value in node.values():
            _collect(value, into)
    elif isinstance(node, list):
        for value in node:
            _collect(value, into)
    elif isinstance(node, float) and 0 <= node <= 1:
        into |= {f"{node:.{d}%}" for d in range(1, 5)}
