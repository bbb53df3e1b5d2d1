"""params.yaml is validated strictly, naming the key at fault."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from mnist_pipeline.params import (
    SECTIONS,
    EvaluateParams,
    ParamsError,
    PromoteParams,
    TrainParams,
    load_params,
    parse_section,
)

from .conftest import ROOT


def test_reference_recipe_is_the_blog_posts():
    from mnist_pipeline.recipes import apply_recipe, load_recipe

    base = load_params(ROOT / "params.yaml", "train")
    train = apply_recipe(base, load_recipe(ROOT / "recipes" / "reference.yaml"))
    assert (train.epochs, train.batch_size, train.lr, train.optimizer) == (20, 100, 0.001, "adam")
    assert train.scheduler == "plateau"
    assert (train.plateau_threshold, train.plateau_patience) == (0.1, 1)
    assert train.plateau_loss == "last_batch" and train.amp == "none"
    assert not (train.val_size or train.augment or train.ema_decay or train.tta
                or train.label_smoothing)
    # the dataclass defaults are the reference recipe too
    assert train == dataclasses.replace(TrainParams(), seed=train.seed)


def test_default_params_are_the_best_single_recipe():
    from mnist_pipeline.recipes import load_recipe

    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in load_recipe(ROOT / "recipes" / "best-single.yaml")["train"].items():
        assert doc["train"][key] == value, key
    assert isinstance(load_params(ROOT / "params.yaml", "evaluate"), EvaluateParams)
    assert load_params(ROOT / "params.yaml", "promote").min_accuracy == 0.995


def test_runs_are_named_by_the_recipe_their_params_match():
    """As `mnist-pipeline models` names them: MLflow params are strings."""
    from mnist_pipeline.params import load_params
    from mnist_pipeline.recipes import apply_recipe, load_recipes, match_recipe

    recipes = load_recipes(ROOT / "recipes")
    assert set(recipes) == {p.stem for p in (ROOT / "recipes").glob("*.yaml")}
    base = load_params(ROOT / "params.yaml", "train")

    def logged(params: TrainParams) -> dict[str, str]:
        return {k: str(v) for k, v in dataclasses.asdict(params).items()}

    for name, recipe in recipes.items():
        assert match_recipe(logged(apply_recipe(base, recipe)), recipes) == name
    assert match_recipe(logged(base), recipes) == "best-single"  # the default
    assert match_recipe(logged(dataclasses.replace(base, epochs=3)), recipes) == "custom"
    assert match_recipe(logged(dataclasses.replace(base, train_subset=2000)), recipes) == (
        "custom")  # a recipe trains on all the images
    assert load_recipes(ROOT / "no-such-folder") == {}


def test_a_recipe_matches_however_its_numbers_are_written(tmp_path):
    """YAML reads 1e-3 as a string and 3 as an integer; the run logs 0.001 and 3.0."""
    from mnist_pipeline.recipes import load_recipes, match_recipe

    (tmp_path / "mine.yaml").write_text("train:\n  lr: 1e-3\n  augment_shift: 3\n")
    logged = {k: str(v) for k, v in dataclasses.asdict(
        dataclasses.replace(TrainParams(), lr=0.001, augment_shift=3.0)).items()}
    assert match_recipe(logged, load_recipes(tmp_path)) == "mine"


@pytest.mark.parametrize("text, fault", [
    ("- lr: 0.1\n", "expected a mapping of sections"),
    ("train:\n", "train: expected a mapping of keys, got None"),
    ("train: [1]\n", "train: expected a mapping of keys"),
])
def test_a_recipe_that_is_not_a_mapping_is_one_message(tmp_path, text, fault):
    from mnist_pipeline.recipes import load_recipe

    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ParamsError, match=fault):
        load_recipe(tmp_path / "bad.yaml")


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")),
                         ids=lambda path: path.stem)
def test_every_recipe_is_valid_and_sets_every_recipe_key(recipe):
    from mnist_pipeline.recipes import load_recipe

    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    overrides = load_recipe(recipe, base)["train"]
    # a recipe applied with `make exp` must not inherit a choice of another recipe
    assert {"epochs", "lr", "scheduler", "val_size", "select_best", "early_stop_patience",
            "label_smoothing", "augment", "ema_decay", "tta"} <= set(overrides)


def test_params_yaml_lists_every_key():
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, cls in SECTIONS.items():
        assert set(doc[section]) == {f.name for f in dataclasses.fields(cls)}, section


def test_dvc_style_numbers_are_accepted():
    # `dvc exp run -S train.lr=1e-4` writes 1e-4, which PyYAML reads as a string
    assert yaml.safe_load("lr: 1e-4")["lr"] == "1e-4"
    params = parse_section("train", {"lr": "1e-4", "epochs": 3.0}, TrainParams)
    assert params.lr == 1e-4 and params.epochs == 3 and isinstance(params.epochs, int)


@pytest.mark.parametrize(
    "raw, fault",
    [
        ({"lrr": 0.1}, r"train\.lrr: unknown key; allowed keys: experiment_name"),
        ({"lr": "fast"}, r"train\.lr: expected a number > 0 and <= 10, got 'fast'"),
        ({"lr": 0}, r"train\.lr: expected a number > 0"),
        ({"lr": float("nan")}, r"train\.lr"),
        ({"epochs": 0}, r"train\.epochs: expected an integer >= 1 and <= 1000, got 0"),
        ({"epochs": 2.5}, r"train\.epochs: expected an integer"),
        ({"epochs": True}, r"train\.epochs"),
        ({"batch_size": 1}, r"train\.batch_size"),
        ({"optimizer": "rmsprop"}, r"train\.optimizer: expected one of 'adam', 'adamw', 'sgd'"),
        ({"plateau_loss": "mean"}, r"train\.plateau_loss: expected one of 'last_batch'"),
        ({"amp": "fp16"}, r"train\.amp"),
        ({"channels_last": "yes"}, r"train\.channels_last: expected true or false"),
        ({"experiment_name": ""}, r"train\.experiment_name: expected a string"),
        ({"experiment_name": 3}, r"train\.experiment_name"),
        ({"onecycle_pct": 1}, r"train\.onecycle_pct: expected a number > 0 and < 1, got 1"),
    ],
)
def test_bad_values_name_the_key(raw, fault):
    with pytest.raises(ParamsError, match=fault):
        parse_section("train", raw, TrainParams)


def test_other_sections():
    assert parse_section("promote", {"min_accuracy": "0.9"}, PromoteParams).min_accuracy == 0.9
    with pytest.raises(ParamsError, match=r"promote\.min_accuracy"):
        parse_section("promote", {"min_accuracy": 1.5}, PromoteParams)
    with pytest.raises(ParamsError, match=r"evaluate\.batch_size"):
        parse_section("evaluate", {"batch_size": -1}, EvaluateParams)


@pytest.mark.parametrize(
    "text, fault",
    [
        ("train: {}\nextra: {}\n", "extra: unknown section"),
        ("evaluate: {}\n", "section 'train' is missing"),
        ("train: [1, 2]\n", "train: expected a mapping"),
        ("train: {lr: [\n", "not valid YAML"),
        ("- a\n", "must be a mapping"),
        ("train: {1: 2, lr: 0.1}\n", "train.1: unknown key"),  # a number among the keys
        ("train: {}\n3: {}\n", "3: unknown section"),
    ],
)
def test_file_level_errors(tmp_path, text, fault):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError, match=fault):
        load_params(path, "train")


def test_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml", "train")


def test_a_folder_or_binary_file_is_no_params_file(tmp_path):
    with pytest.raises(ParamsError, match="cannot read"):
        load_params(tmp_path, "train")
    binary = tmp_path / "params.yaml"
    binary.write_bytes(b"train:\n  lr: \xff\xfe\n")
    with pytest.raises(ParamsError, match="is not UTF-8 text"):
        load_params(binary, "train")


def test_params_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainParams().lr = 1.0  # type: ignore[misc]


def _run_stage(stage: str, params: Path, cwd: Path, given: str = "x"):
    """The stage's script with `params`, its input from an earlier stage (train's stats,
    evaluate's run record) named `given`, the other paths single letters in `cwd`."""
    import subprocess
    import sys

    paths = {"train": ["--raw", "x", "--stats", given, "--weights", "w", "--metrics", "m",
                       "--history", "h", "--run-info", "r"],
             "evaluate": ["--raw", "x", "--run-info", given, "--metrics", "m", "--report", "e",
                          "--confusion", "c", "--misclassified", "p"]}[stage]
    return subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py"), "--params",
                           str(params), *paths], cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize("stage, section, key, value, fault", [
    ("train", "train", "lr", "fast", "train.lr: expected a number > 0"),
    ("train", "train", "epochs", 0, "train.epochs: expected an integer >= 1"),
    ("train", "train", "optimiser", "adam", "train.optimiser: unknown key"),
    ("evaluate", "evaluate", "batch_size", -5, "evaluate.batch_size"),
])
def test_stages_refuse_bad_params_before_any_work(tmp_path, stage, section, key, value, fault):
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    doc[section][key] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    done = _run_stage(stage, tmp_path / "params.yaml", tmp_path)
    assert done.returncode == 1 and fault in done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


def test_a_recipe_with_a_bad_value_is_named_in_the_error(tmp_path):
    from mnist_pipeline.recipes import load_recipe

    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train:\n  epochs: 0\n")
    with pytest.raises(ParamsError, match=r"recipe .*bad\.yaml: params: train\.epochs"):
        load_recipe(recipe)


@pytest.mark.parametrize("stage, name, text, fault", [
    ("train", "stats.json", None, "stats.json not found"),
    ("train", "stats.json", "{", "stats.json is not a JSON file"),
    ("train", "stats.json", "[0.1, 0.3]", "stats.json: expected a JSON object, got list"),
    ("train", "stats.json", '{"mean": 0.1}', "stats.json has no std"),
    ("train", "stats.json", '{"mean": 0.1, "std": 0}', "stats.json: std is 0, not a usable"),
    ("train", "stats.json", '{"mean": "x", "std": 0.3}', "stats.json: mean is 'x'"),
    ("evaluate", "run.json", "", "run.json is not a JSON file"),
    ("evaluate", "run.json", '{"version": 1}', "run.json has no run_id"),
])
def test_stages_refuse_bad_input_files_before_any_work(tmp_path, stage, name, text, fault):
    """A missing, corrupt or incomplete file from an earlier stage stops the stage with one
    message naming the file, before any work: no traceback, no output."""
    if text is not None:
        (tmp_path / name).write_text(text)
    done = _run_stage(stage, ROOT / "params.yaml", tmp_path, given=name)
    assert done.returncode == 1 and fault in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ([name] if text is not None else [])


@pytest.mark.parametrize("stage, given, text, taken", [
    ("train", "stats.json", '{"mean": 0.1307, "std": 0.3081}', "w"),
    ("evaluate", "run.json", '{"run_id": "r1", "registry_uri": "models:/m/1"}', "e"),
])
def test_stages_refuse_an_output_path_that_is_a_folder_before_any_work(tmp_path, stage, given,
                                                                        text, taken):
    """An output file whose path is taken by a folder stops the stage at once (not after
    training or at the end of the evaluation), with one message naming it."""
    (tmp_path / given).write_text(text)
    (tmp_path / taken).mkdir()
    done = _run_stage(stage, ROOT / "params.yaml", tmp_path, given=given)
    assert done.returncode == 1 and f"{taken} is a folder; expected a file" in done.stderr, \
        done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([given, taken])
    assert not any((tmp_path / taken).iterdir())


@pytest.mark.parametrize("section, key, value, fault", [
    ("train", "registered_model", "mnist.cnn", "a name of letters, digits, _ and -"),
    ("train", "registered_model", "team/mnist", "a name of letters, digits, _ and -"),
    ("promote", "alias", "best model", "expected letters, digits, _ and -"),
    ("promote", "alias", "latest", "name versions in MLflow"),
    ("promote", "alias", "v3", "name versions in MLflow"),
])
def test_names_mlflow_would_refuse_are_refused_when_loaded(section, key, value, fault):
    """MLflow refuses these only when the model is logged (after training) or the alias set."""
    with pytest.raises(ParamsError, match=f"params: {section}.{key}: .*{fault}"):
        parse_section(section, {key: value}, SECTIONS[section])
    assert parse_section(section, {key: "my_model-2"}, SECTIONS[section])
