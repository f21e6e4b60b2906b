"""The shape of the `ct_edge` package (../shared/DESIGN.md): a library with thin front ends.

- the library never imports a front end (cli, server, dicom_node);
- front ends never import each other, except that a `ct-edge` command module starts one;
- no import circle between modules, lazy and type-checking imports included;
- no private `_name` imported from another module, here or anywhere in the repository
  (training, convert, benchmarks, tools, tests);
- command modules import only the standard library and ct_edge at module level (start-up time).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "runtime" / "ct_edge"
# The repository's own top-level packages (what a private name may not be taken from).
OWN_PACKAGES = ("ct_edge", "training", "convert", "benchmarks", "tools", "tests")
FRONT_ENDS = ("cli", "server", "dicom_node")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["ct_edge", *parts])


def modules() -> dict[str, tuple[Path, ast.Module]]:
    return {module_name(path): (path, ast.parse(path.read_text(), str(path)))
            for path in sorted(PACKAGE.rglob("*.py"))}


def resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports(found: dict[str, tuple[Path, ast.Module]]) -> dict[str, set[str]]:
    """Module -> the ct_edge modules it imports anywhere in its body."""
    edges: dict[str, set[str]] = {}
    for name, (path, tree) in found.items():
        targets: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = resolve(name, path.name == "__init__.py", node)
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    targets.add(sub if sub in found else target)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        edges[name] = {t for t in targets if t in found and t != name}
    return edges


def front_end(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FRONT_ENDS else None


FOUND = modules()
EDGES = imports(FOUND)


def test_the_library_never_imports_a_front_end() -> None:
    bad = [(a, b) for a, targets in EDGES.items() for b in targets
           if front_end(a) is None and front_end(b) is not None]
    assert bad == []


def test_front_ends_do_not_import_each_other() -> None:
    # A command module (`ct-edge serve`, `ct-edge listen`) may start another front end.
    bad = [(a, b) for a, targets in EDGES.items() for b in targets
           if front_end(a) and front_end(b) and front_end(a) != front_end(b)
           and front_end(a) != "cli"]
    assert bad == []


def test_no_import_circle() -> None:
    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            current = todo.pop()
            if current == goal:
                return True
            if current not in seen:
                seen.add(current)
                todo.extend(EDGES.get(current, ()))
        return False

    # A package's __init__ importing its own submodules (and back) is how packages work.
    circles = sorted({tuple(sorted((a, b))) for a, targets in EDGES.items() for b in targets
                      if reaches(b, a) and not (a.startswith(b + ".") or b.startswith(a + "."))})
    assert circles == []


def test_no_private_name_is_imported_across_modules() -> None:
    bad = []
    for name, (path, tree) in FOUND.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and resolve(name, path.name == "__init__.py",
                                                            node).startswith("ct_edge"):
                bad += [f"{name}: {alias.name}" for alias in node.names
                        if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert bad == []


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(path: Path) -> list[str]:
    """`from <own module> import _name` and `<own module>._name` in one file."""
    tree = ast.parse(path.read_text(), str(path))
    own_modules: set[str] = set()  # local names bound to one of the repository's modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0]
                                                 in OWN_PACKAGES):
            found += [f"from {node.module} import {a.name}" for a in node.names if private(a.name)]
            own_modules.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Import):
            own_modules.update(a.asname or a.name.split(".")[0] for a in node.names
                               if a.name.split(".")[0] in OWN_PACKAGES)
    found += [f"{node.value.id}.{node.attr}" for node in ast.walk(tree)
              if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id in own_modules and private(node.attr)]
    return found


def test_no_private_name_is_taken_from_another_module_anywhere() -> None:
    files = [path for folder in ("training", "convert", "benchmarks", "tools", "tests", "runtime")
             for path in sorted((REPO / folder).rglob("*.py"))]
    assert len(files) > 100
    bad = [f"{path.relative_to(REPO)}: {use}" for path in files for use in private_uses(path)]
    assert bad == []


def imported_packages_of(path: Path) -> set[str]:
    """The repository's top-level packages that one module imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and not node.level:
            found.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
    return found & set(OWN_PACKAGES)


def imported_packages(folder: Path) -> set[str]:
    """The repository's top-level packages that the modules under `folder` import, anywhere."""
    return set().union(*(imported_packages_of(path) for path in folder.rglob("*.py")))


@pytest.mark.parametrize(("folder", "allowed"), [
    ("runtime/ct_edge", {"ct_edge"}),  # what ships to a device stands alone
    ("training", {"ct_edge", "training", "convert"}),  # evaluate proves int8 the way convert does
    ("convert", {"ct_edge", "training", "convert"}),
])
def test_the_heavy_side_never_imports_benchmarks_or_tools(folder: str, allowed: set[str]) -> None:
    assert imported_packages(REPO / folder) <= allowed


def test_training_imports_convert_only_in_the_cross_validation_harness() -> None:
    """convert builds on training (models, data, ensembles); the one way back is evaluate, which
    scores int8 on held-out folds the way `make convert` writes it. Anything else would be an
    import circle between the two packages."""
    importers = sorted(path.relative_to(REPO).as_posix() for path in (REPO / "training").rglob("*.py")
                       if "convert" in imported_packages_of(path))
    assert importers == ["training/evaluate.py"]


def test_the_private_name_check_sees_both_forms(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("from training.train import _hidden\nfrom training import evaluate\n"
                      "import numpy as np\nevaluate._config(np._NoValue)\n")
    assert private_uses(sample) == ["from training.train import _hidden", "evaluate._config"]


@pytest.mark.parametrize("name", sorted(n for n in FOUND if n.startswith("ct_edge.cli")))
def test_command_modules_import_only_the_standard_library_up_front(name: str) -> None:
    _, tree = FOUND[name]
    heavy = []
    for node in tree.body:  # module level only: functions import what they run
        if isinstance(node, ast.Import):
            heavy += [a.name for a in node.names if a.name.split(".")[0] not in sys.stdlib_module_names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            root = node.module.split(".")[0]
            if root not in sys.stdlib_module_names and root != "__future__":
                heavy.append(node.module)
    assert heavy == []
