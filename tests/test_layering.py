"""The engine is a library: nothing under vramancer/engine may import the UI."""

import ast
import pathlib
import subprocess
import sys

ENGINE = pathlib.Path(__file__).resolve().parents[1] / "vramancer" / "engine"
FORBIDDEN = ("textual", "vramancer.app", "vramancer.widgets")


def imported_modules(path: pathlib.Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_engine_sources_do_not_import_the_ui():
    offenders = [
        f"{path.name}: {module}"
        for path in sorted(ENGINE.rglob("*.py"))
        for module in imported_modules(path)
        if module.split(".")[0] == "textual" or module.startswith(FORBIDDEN[1:])
    ]
    assert offenders == []


def test_importing_the_whole_engine_loads_no_textual():
    code = (
        "import sys, vramancer.engine.worker, vramancer.engine.telemetry, vramancer.engine.events; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'textual' or m.startswith(('vramancer.app', 'vramancer.widgets'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
