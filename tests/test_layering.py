"""The shape of the import graph: the engine is a library with one seam for devices.

Every import is read from the sources, function-level ones included (an import inside a
function still ties two modules together; it only hides the tie from a glance at the top).
"""

import ast
import pathlib
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "vramancer"
ENGINE = "vramancer.engine"
CLUSTER = "vramancer.cluster"
FACTORY = "vramancer.engine.factory"
UI = ("textual", "vramancer.app", "vramancer.widgets")
# What engine/cluster may not reach for: the engine's face, its UI contract and its threads.
ABOVE_CLUSTER = ("vramancer.engine.engine", "vramancer.engine.events", "vramancer.engine.worker",
                 "vramancer.engine.telemetry", FACTORY)


@dataclass(frozen=True)
class Import:
    importer: str  # the importing module
    target: str  # the module imported (a submodule when `from package import submodule`)
    name: str | None  # the name taken from `target`, if any (`from target import name`)
    line: int
    nested: bool  # inside a function or class body


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


SOURCES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def is_package(module: str) -> bool:
    return SOURCES.get(module, pathlib.Path()).name == "__init__.py"


def resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package(importer) else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str) -> list[Import]:
    tree = ast.parse(SOURCES[module].read_text(), filename=str(SOURCES[module]))
    found: list[Import] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(module, alias.name, None, child.lineno, nested) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                source = resolve(module, child)
                for alias in child.names:
                    submodule = f"{source}.{alias.name}"
                    if submodule in SOURCES:
                        found.append(Import(module, submodule, None, child.lineno, nested))
                    else:
                        found.append(Import(module, source, alias.name, child.lineno, nested))
            visit(child, inner)

    visit(tree, False)
    return found


ALL = [imp for module in SOURCES for imp in imports_of(module)]


def private_attributes(module: str) -> list[str]:
    """`alias._name` where `alias` is a vramancer module this module imported."""
    tree = ast.parse(SOURCES[module].read_text())
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("vramancer.") and alias.asname:
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            source = resolve(module, node)
            for alias in node.names:
                if f"{source}.{alias.name}" in SOURCES:
                    aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
    return [
        f"{module}:{node.lineno} {node.value.id}.{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
        and node.attr.startswith("_") and not node.attr.startswith("__")
    ]


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_the_walk_sees_function_level_imports():
    """The rules below would pass vacuously if nested imports were missed."""
    nested = [imp for imp in ALL if imp.nested and imp.importer == FACTORY and within(imp.target, CLUSTER)]
    assert nested, "the factory opens engine/cluster lazily, inside its functions"


def test_engine_sources_do_not_import_the_ui():
    offenders = [
        f"{imp.importer}:{imp.line} {imp.target}"
        for imp in ALL
        if within(imp.importer, ENGINE) and any(within(imp.target, ui) for ui in UI)
    ]
    assert offenders == []


def test_no_circle_in_the_engine():
    graph: dict[str, set[str]] = {}
    for imp in ALL:
        if within(imp.importer, ENGINE) and within(imp.target, ENGINE) and imp.target != imp.importer:
            graph.setdefault(imp.importer, set()).add(imp.target)
    # Depth-first search; a grey node met again closes a circle.
    state: dict[str, str] = {}
    circles: list[list[str]] = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = "grey"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "grey":
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = "black"

    for start in sorted(graph):
        if start not in state:
            walk(start, [start])
    assert circles == []


def test_only_the_factory_imports_the_cluster():
    offenders = sorted({
        f"{imp.importer}:{imp.line} {imp.target}"
        for imp in ALL
        if within(imp.target, CLUSTER) and not within(imp.importer, CLUSTER) and imp.importer != FACTORY
    })
    assert offenders == []


def test_the_cluster_does_not_reach_above_itself():
    offenders = [
        f"{imp.importer}:{imp.line} {imp.target}"
        for imp in ALL
        if within(imp.importer, CLUSTER) and (any(within(imp.target, up) for up in ABOVE_CLUSTER) or imp.target == ENGINE)
    ]
    assert offenders == []


def test_no_module_takes_another_modules_private_names():
    offenders = [
        f"{imp.importer}:{imp.line} {imp.target}.{imp.name}"
        for imp in ALL
        if imp.name and imp.name.startswith("_") and not imp.name.startswith("__") and within(imp.target, "vramancer")
    ]
    offenders += [hit for module in SOURCES for hit in private_attributes(module)]
    assert offenders == []


@pytest.mark.parametrize("pattern, allowed", [
    # Whether a device is another machine's, or lost, is the device's answer, asked of it directly.
    (r'\.remote\b|is_remote|getattr\([^)]*"(remote|lost|node)"', (CLUSTER, FACTORY)),
    # Behaviour by kind of device lives in the Device subclasses.
    (r"kind ==", ("vramancer.platforms.devices",)),
])
def test_device_kinds_are_asked_of_devices(pattern, allowed):
    offenders = [
        f"{module}:{number}: {line.strip()}"
        for module, path in SOURCES.items()
        if not any(within(module, ok) for ok in allowed)
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(pattern, line)
    ]
    assert offenders == []


def test_importing_the_whole_engine_loads_no_textual_and_no_cluster():
    code = (
        "import sys, vramancer.engine.worker, vramancer.engine.telemetry, vramancer.engine.events; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'textual' "
        "or m.startswith(('vramancer.app', 'vramancer.widgets', 'vramancer.cluster'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
