"""The package's folders are its layers (the "Layout" paragraph of quasistatic/__init__.py): a module
imports only from its own folder and the layers below it, and every module belongs to a layer."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "quasistatic"

# Top to bottom; the packages of one row are side by side and do not import one another.
LAYERS = [
    {"__main__"},  # python -m quasistatic
    {"cli"},
    {"experiments"},
    {"continuation"},
    {"processes", "linalg", "integrators"},
    {"thermo"},
    {"models", "data"},
    {"registry", "work", "distributed"},
    {"errors"},
]
RANK = {part: len(LAYERS) - i for i, row in enumerate(LAYERS) for part in row}


def part_of(path: Path) -> str:
    """The layer part of a file of the package: its top-level folder, or its module name at the root."""
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imported_parts(path: Path) -> set[str]:
    """The top-level parts of the package that the file at ``path`` imports (relative imports resolved);
    the package root itself (``from .. import __version__``) is left out."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name.split(".") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[:len(package) - node.level + 1]) + (node.module.split(".") if node.module else [])
            else:
                base = (node.module or "").split(".")
            targets = [base + [alias.name] for alias in node.names] if len(base) == 1 else [base]
        else:
            continue
        for target in targets:
            if target[0] == "quasistatic" and len(target) > 1 and target[1] in RANK:
                found.add(target[1])
    return found


def test_every_module_belongs_to_a_layer():
    parts = {part_of(path) for path in PACKAGE.rglob("*.py")} - {"__init__"}
    assert parts <= set(RANK), f"not in a layer of tests/test_layout.py: {sorted(parts - set(RANK))}"


def test_a_layer_imports_only_from_the_layers_below():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent == PACKAGE and path.stem == "__init__":
            continue  # the public API re-exports every layer
        part = part_of(path)
        for other in imported_parts(path):
            if other != part and RANK[other] >= RANK[part]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)} imports quasistatic.{other}")
    assert wrong == []
