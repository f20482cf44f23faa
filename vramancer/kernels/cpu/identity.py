"""Which build of our CPU kernels fits this torch and this Python: the sources, the flags and
the key naming them. It imports nothing of VRAMancer, so setup.py can load it by its path while
the package is built, before VRAMancer's own dependencies are installed."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

NAME = "vramancer_quant_linear"  # the extension module's name, compiled or installed
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-std=c++17"]
SOURCE_DIR = Path(__file__).with_name("src")
# Bumped when the layout of a build folder changes, so a folder of an older layout is never read.
LAYOUT = "complete-folders-1"


def sources() -> list[Path]:
    """Every C++ source of the extension (bindings.cpp binds what kernels.h declares)."""
    return sorted(SOURCE_DIR.glob("*.cpp"))


def build_key(torch_version: str) -> str:
    """16 hex digits naming the sources, the flags, the torch and the Python of a build."""
    text = b"".join(path.name.encode() + path.read_bytes() for path in sorted(SOURCE_DIR.glob("*.[ch]*")))
    stamp = f"{' '.join(FLAGS)} {torch_version} {sys.version_info[:2]} {LAYOUT}".encode()
    return hashlib.sha256(text + stamp).hexdigest()[:16]
