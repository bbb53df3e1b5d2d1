"""dvc.yaml lists, for each stage, exactly the library modules its script can import (directly
or through other modules, at module level or inside functions), and the non-Python sources
those modules read (the C++ of `fused`): a change to any of them, and to no other, makes
`dvc repro` re-run the stage."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "mnist_pipeline"


def imported_modules(path: Path) -> set[str]:
    """Names of the mnist_pipeline modules that the file at `path` imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if (node.level and PACKAGE in path.parents) or base.startswith("mnist_pipeline"):
                base = base.removeprefix("mnist_pipeline").lstrip(".")
                if base:
                    found.add(base.split(".")[0])
                else:  # from . import registry
                    found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names
                         if alias.name.startswith("mnist_pipeline."))
    unknown = {name for name in found if not (PACKAGE / f"{name}.py").exists()}
    assert not unknown, f"{path}: imports {sorted(unknown)}, not modules of the package"
    return found


def sources_read(name: str) -> set[str]:
    """Files of the package that module `name` reads rather than imports: csrc/*.cpp, and
    modules it names as files (registry logs `served_model.py` with every model)."""
    text = (PACKAGE / f"{name}.py").read_text(encoding="utf-8")
    return ({f"src/mnist_pipeline/csrc/{path.name}" for path in (PACKAGE / "csrc").glob("*")
             if path.name in text}
            | {f"src/mnist_pipeline/{path.name}" for path in PACKAGE.glob("*.py")
               if f'"{path.name}"' in text})


def closure(script: Path) -> set[str]:
    todo, seen = set(imported_modules(script)), set()
    while todo:
        name = todo.pop()
        seen.add(name)
        todo |= imported_modules(PACKAGE / f"{name}.py") - seen
    return ({f"src/mnist_pipeline/{name}.py" for name in seen}
            | {src for name in seen for src in sources_read(name)})


def test_every_csrc_file_is_read_by_a_module():
    read = {src for path in PACKAGE.glob("*.py") for src in sources_read(path.stem)
            if "/csrc/" in src}
    assert read == {f"src/mnist_pipeline/csrc/{p.name}" for p in (PACKAGE / "csrc").glob("*")}


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_lists_exactly_the_library_modules_it_imports(name):
    stage = STAGES[name]
    script = next(word for word in stage["cmd"].split() if word.startswith("stages/"))
    assert script in stage["deps"], f"{name}: its script {script} is not a dependency"
    listed = {d for d in stage["deps"] if isinstance(d, str) and d.startswith("src/")}
    needed = closure(ROOT / script)
    assert not needed - listed, f"{name}: imports but does not list {sorted(needed - listed)}"
    assert not listed - needed, f"{name}: lists but never imports {sorted(listed - needed)}"
