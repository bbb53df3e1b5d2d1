"""Named recipes: YAML files of params overrides (recipes/*.yaml), validated like params.yaml.

    python -m mnist_pipeline.recipes recipes/best-single.yaml   # prints `-S key=value` flags
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from .errors import run_stage
from .params import SECTIONS, ParamsError, coerce_value, parse_section


def load_recipe(path: str | Path, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The recipe's overrides {section: {key: value}}, checked against the params schema."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ParamsError(f"recipe {path}: cannot read it: {exc}") from None
    if not isinstance(doc, dict):
        raise ParamsError(f"recipe {path}: expected a mapping of sections, got {doc!r}")
    for section, overrides in doc.items():
        if section not in SECTIONS:
            raise ParamsError(f"recipe {path}: {section}: unknown section")
        if not isinstance(overrides, dict):
            raise ParamsError(f"recipe {path}: {section}: expected a mapping of keys, got "
                              f"{overrides!r}")
        try:
            parse_section(section, {**(base or {}).get(section, {}), **overrides},
                          SECTIONS[section])
        except ParamsError as exc:
            raise ParamsError(f"recipe {path}: {exc}") from None
    return doc


def apply_recipe(params: Any, overrides: dict[str, Any], section: str = "train") -> Any:
    """`params` (a section's dataclass) with the recipe's overrides of that section."""
    merged = {**dataclasses.asdict(params), **overrides.get(section, {})}
    return parse_section(section, merged, type(params))


def load_recipes(folder: str | Path) -> dict[str, dict[str, Any]]:
    """Every recipe in `folder` by name (the file's stem); none if the folder is missing."""
    folder = Path(folder)
    return {path.stem: load_recipe(path) for path in sorted(folder.glob("*.yaml"))
            } if folder.is_dir() else {}


def match_recipe(params: dict[str, str], recipes: dict[str, dict[str, Any]]) -> str:
    """The name of the recipe whose train overrides all equal `params` (an MLflow run's
    params, as strings), the most specific one if several do; else 'custom'. A run on part
    of the training images (train_subset) is 'custom' whatever its recipe: every recipe
    trains on all of them."""
    if params.get("train_subset", "0") != "0":
        return "custom"
    fits = [(len(r.get("train", {})), name) for name, r in recipes.items()
            if all(params.get(k) == str(coerce_value("train", k, v))
                   for k, v in r.get("train", {}).items())]
    return max(fits)[1] if fits else "custom"


def set_flags(recipe: dict[str, Any]) -> list[str]:
    """`dvc exp run` flags that apply the recipe: -S section.key=value ..."""
    flags = []
    for section, overrides in recipe.items():
        for key, value in overrides.items():
            text = str(value).lower() if isinstance(value, bool) else str(value)
            flags += ["-S", f"{section}.{key}={text}"]
    return flags


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m mnist_pipeline.recipes",
                                     description="Print the `dvc exp run -S` flags of a recipe.")
    parser.add_argument("recipe", type=Path, help="a recipe file, e.g. recipes/reference.yaml")
    print(" ".join(set_flags(load_recipe(parser.parse_args().recipe))))


if __name__ == "__main__":
    run_stage(main)
