"""The shape of the import graph: packages by role, each importing only those below it.

The order (docs/design/architecture.md): config < planning < platforms, quantization, kernels
< model < runtime < scheduling, profiling < cluster < engine < server, app, widgets < cli. The
one way up is the engine's factory, which opens the cluster lazily (vLLM's executor seam).

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

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "vramancer"
ENGINE = "vramancer.engine"
RANKS = {
    "vramancer.config": 0,
    "vramancer.planning": 1,
    "vramancer.platforms": 2, "vramancer.quantization": 2, "vramancer.kernels": 2,
    "vramancer.model": 3,
    "vramancer.runtime": 4,
    "vramancer.scheduling": 5, "vramancer.profiling": 5,
    "vramancer.cluster": 6,
    "vramancer.engine": 7,
    # The UI contract is plain data (the scheduler emits it, the UI and server read it).
    "vramancer.engine.events": 2,
    "vramancer.server": 8, "vramancer.app": 8, "vramancer.widgets": 8,
    "vramancer.cli": 9, "vramancer": 9,
}
# Packages a UI process imports to draw its first frame, before torch: they must not pull it in.
TORCH_FREE = ("vramancer.config", "vramancer.planning", "vramancer.engine.events", "vramancer.platforms.readings")
CLUSTER = "vramancer.cluster"
FACTORY = "vramancer.engine.factory"
UI = ("textual", "vramancer.app", "vramancer.widgets")
# What cluster/ may not reach for: the engine's face, its UI contract and its threads.
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
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                continue  # names for annotations only: no import at run time
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
    assert nested, "the factory opens cluster/ lazily, inside its functions"


def rank(module: str) -> int:
    """The rank of the package `module` belongs to (its longest listed prefix)."""
    owner = max((package for package in RANKS if within(module, package)), key=len)
    return RANKS[owner]


def test_every_module_has_a_package_with_a_rank():
    assert all(any(within(module, package) for package in RANKS) for module in SOURCES)
    top_level = [module for module in SOURCES if module.count(".") == 1 and not is_package(module)]
    assert sorted(top_level) == ["vramancer.__main__"], "modules belong in a package by role"


def test_no_package_imports_one_above_it():
    offenders = [
        f"{imp.importer}:{imp.line} {imp.target}"
        for imp in ALL
        if within(imp.target, "vramancer") and imp.target != "vramancer"
        and rank(imp.target) > rank(imp.importer) and imp.importer != FACTORY
    ]
    assert offenders == []


def test_below_the_ui_nothing_imports_the_ui():
    offenders = [
        f"{imp.importer}:{imp.line} {imp.target}"
        for imp in ALL
        if rank(imp.importer) < RANKS["vramancer.app"] and any(within(imp.target, ui) for ui in UI)
    ]
    assert offenders == []


def test_plain_data_packages_import_no_torch():
    heavy = ("torch", "transformers", "torchao", "accelerate", "gguf", "safetensors", "numpy")
    code = (
        f"import sys; import {', '.join(TORCH_FREE)}; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(heavy)!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_circle_between_modules():
    graph: dict[str, set[str]] = {}
    for imp in ALL:
        if within(imp.importer, "vramancer") and within(imp.target, "vramancer") and imp.target != imp.importer \
                and imp.target in SOURCES and not is_package(imp.target):
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
