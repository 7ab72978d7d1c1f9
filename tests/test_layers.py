"""The package's layers, checked from the source: no import cycle, and no layer importing one above it.

``LAYERS`` is the one table of the layering (docs/design.md draws it): lowest first; a module may import its own unit
(a module, or a subpackage and everything in it) and any unit of an earlier layer, never a later layer nor another
unit of its own layer (``training`` and ``deploy`` are siblings that do not know each other). Every import counts,
including the ones inside functions and under ``TYPE_CHECKING``: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dynsila"

LAYERS: list[list[str]] = [
    ["dynsila.errors", "dynsila.console"],  # foundation: no dynsila imports
    ["dynsila.models"],  # architectures (the models/ folder)
    ["dynsila.config"],
    ["dynsila.cli", "dynsila.val_indices"],  # one-line command-line errors; a validation split listed in a file
    ["dynsila.data", "dynsila.optim", "dynsila.runtime", "dynsila.distributed"],
    ["dynsila.methods"],  # training techniques
    ["dynsila.budget"],  # exit costs and thresholds
    ["dynsila.runs", "dynsila.policies"],  # run directory, checkpoints, model builder; exit policies
    ["dynsila.evaluation"],
    ["dynsila.training", "dynsila.deploy"],
    # the command lines and the public API
    [
        "dynsila",
        "dynsila.train",
        "dynsila.evaluate",
        "dynsila.infer",
        "dynsila.export",
        "dynsila.flops",
        "dynsila.convert",
        "dynsila.predict",
        "dynsila.plot",
    ],
]


def module_sources(root: Path) -> dict[str, Path]:
    """Module name -> file, for every .py file under ``root`` (the models symlink followed)."""
    found: dict[str, Path] = {}
    for folder, _, files in os.walk(root, followlinks=True):
        for file in files:
            if not file.endswith(".py"):
                continue
            parts = list(Path(folder).relative_to(root.parent).parts)
            if file != "__init__.py":
                parts.append(file[:-3])
            found[".".join(parts)] = Path(folder) / file
    return found


def imported_modules(module: str, source: str, known: Iterable[str]) -> set[str]:
    """The modules among ``known`` that ``source`` (the text of ``module``) imports, anywhere in it."""
    known = set(known)
    package = module if _is_package(module, known) else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets.update(_known_prefix(alias.name, known) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level, package)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in known else _known_prefix(base, known))
    targets.discard("")
    targets.discard(module)
    return targets


def _is_package(module: str, known: set[str]) -> bool:
    return any(other.startswith(module + ".") for other in known)


def _absolute(name: str | None, level: int, package: str) -> str:
    if level == 0:
        return name or ""
    base = package.split(".")[: len(package.split(".")) - (level - 1)]
    return ".".join([*base, *([name] if name else [])])


def _known_prefix(name: str, known: set[str]) -> str:
    """The longest known module that ``name`` is or lies in ("" for third-party names)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    return ""


def unit_of(module: str, layers: list[list[str]]) -> tuple[int, str]:
    """(layer index, unit) of a module: the longest unit that is the module or contains it (the package itself,
    "dynsila", contains nothing: each of its modules is named in the table)."""
    best: tuple[int, str] | None = None
    for index, units in enumerate(layers):
        for unit in units:
            inside = module == unit or (unit != "dynsila" and module.startswith(unit + "."))
            if inside and (best is None or len(unit) > len(best[1])):
                best = (index, unit)
    if best is None:
        raise LookupError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")
    return best


def upward_imports(graph: Mapping[str, set[str]], layers: list[list[str]]) -> list[str]:
    """Each import that breaks the layering, as 'importer -> imported (why)'."""
    broken = []
    for module, targets in sorted(graph.items()):
        layer, unit = unit_of(module, layers)
        for target in sorted(targets):
            target_layer, target_unit = unit_of(target, layers)
            if target_unit == unit or target_layer < layer:
                continue
            why = "a layer above" if target_layer > layer else "a sibling in the same layer"
            broken.append(f"{module} -> {target} ({why})")
    return broken


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def import_graph(sources: Mapping[str, str]) -> dict[str, set[str]]:
    return {module: imported_modules(module, text, sources) for module, text in sources.items()}


@pytest.fixture(scope="module")
def package_graph() -> dict[str, set[str]]:
    files = module_sources(PACKAGE)
    assert {"dynsila.methods.sila", "dynsila.models.msdnet", "dynsila.train"} <= set(files)
    return import_graph({module: path.read_text() for module, path in files.items()})


def test_the_package_has_no_import_cycle(package_graph):
    assert find_cycle(package_graph) is None


def test_no_layer_imports_a_layer_above_it_or_a_sibling(package_graph):
    assert upward_imports(package_graph, LAYERS) == []


def test_every_module_is_in_the_layer_table(package_graph):
    for module in package_graph:
        unit_of(module, LAYERS)  # raises for a module no layer names


def test_the_checks_catch_a_cycle_an_upward_import_and_a_sibling_import():
    sources = {
        "dynsila": "",
        "dynsila.errors": "",
        "dynsila.methods": "",
        "dynsila.methods.a": "from dynsila.methods import b\n",
        "dynsila.methods.b": "def f():\n    from dynsila.methods.a import g  # lazy, still counted\n",
        "dynsila.runs": "",
        "dynsila.runs.rundir": "from dynsila.evaluation.evaluate import x\nfrom ..errors import E\n",
        "dynsila.evaluation": "",
        "dynsila.evaluation.evaluate": "import dynsila.runs.rundir\n",
        "dynsila.training": "",
        "dynsila.training.train": "from dynsila.deploy import export\n",
        "dynsila.deploy": "",
        "dynsila.deploy.export": "import torch\n",
    }
    graph = import_graph(sources)
    assert graph["dynsila.runs.rundir"] == {"dynsila.evaluation.evaluate", "dynsila.errors"}  # relative resolved
    assert find_cycle(graph) == ["dynsila.evaluation.evaluate", "dynsila.runs.rundir", "dynsila.evaluation.evaluate"]
    assert upward_imports(graph, LAYERS) == [
        "dynsila.runs.rundir -> dynsila.evaluation.evaluate (a layer above)",
        "dynsila.training.train -> dynsila.deploy.export (a sibling in the same layer)",
    ]
    with pytest.raises(LookupError, match="dynsila.plugins"):
        unit_of("dynsila.plugins", LAYERS)
