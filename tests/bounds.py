"""The range of versions pyproject.toml promises for the libraries the suite is run against at
both ends (torch, transformers, textual, torchao), read from pyproject.toml itself so the promise
is stated once. `python -m tests.bounds` prints the lowest as pip constraints, which
`make test-oldest` installs; it needs nothing beyond the standard library, so any Python runs it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
TESTED = ("torch", "transformers", "textual", "torchao")


def declared() -> dict[str, str]:
    """Each tested library's specifier as pyproject.toml's dependencies state it (">=5.24.0,<5.26")."""
    text = PYPROJECT.read_text()
    found = dict(re.findall(r'^\s*"(' + "|".join(TESTED) + r')\s*([<>=!~][^";]*)"', text, re.M))
    missing = [name for name in TESTED if name not in found]
    if missing:
        raise ValueError(f"pyproject.toml states no version range for {', '.join(missing)}.")
    return {name: found[name].replace(" ", "") for name in TESTED}


def lowest() -> dict[str, str]:
    """Each tested library's lower bound (the version after `>=`)."""
    bounds = {}
    for name, spec in declared().items():
        low = re.search(r">=([0-9][0-9.]*)", spec)
        if low is None:
            raise ValueError(f"pyproject.toml gives {name} no lower bound ({spec}).")
        bounds[name] = low.group(1)
    return bounds


if __name__ == "__main__":
    try:
        print("\n".join(f"{name}=={version}" for name, version in lowest().items()))
    except ValueError as exc:
        sys.exit(f"tests.bounds: {exc}")
