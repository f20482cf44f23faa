"""llama.cpp's own tools, the anchors several benchmarks measure VRAMancer against.

    make anchors                       # or: python -m benchmarks.llama_cpp build
    python -m benchmarks.llama_cpp     # says what is built and where

llama.cpp is not one of our dependencies. `build` takes its source from the package registry
(llama-cpp-python's source distribution carries the whole of llama.cpp), compiles
`llama-server`, `llama-quantize`, `llama-bench` and `llama-cli` with CMake into `.anchors/` at
the repository's root, and sets up a Python of its own there with the `llama_cpp` bindings over
the same libraries. About 20 minutes on two cores, once. `VRM_LLAMA_CPP` names another folder
laid out the same way (`build/bin/`, `python/`).

The build targets AVX2 without `-march=native`: on the virtual CPUs we measured on, llama.cpp's
native AVX-512 build crashed at the first token, so the anchor is its AVX2 build everywhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERSION = "0.3.36"  # llama-cpp-python's release; its vendor/llama.cpp is the llama.cpp measured
TOOLS = ("llama-server", "llama-quantize", "llama-bench", "llama-cli")
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON",
               "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_AVX512=OFF", "-DGGML_AMX_TILE=OFF",
               "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF")
# What the bindings import besides the libraries (llama-cpp-python's own dependencies).
BINDING_DEPENDENCIES = ("numpy", "jinja2", "diskcache", "typing-extensions")


def home() -> Path:
    return Path(os.environ.get("VRM_LLAMA_CPP") or ROOT / ".anchors")


def source() -> Path:
    """llama.cpp's source tree (its converter and gguf-py are there)."""
    return home() / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"


def tool(name: str) -> Path | None:
    """One of llama.cpp's programs, if built."""
    path = home() / "build" / "bin" / name
    return path if path.is_file() and os.access(path, os.X_OK) else None


def python() -> str | None:
    """A Python that imports llama_cpp over the built libraries, if set up."""
    path = home() / "python" / "bin" / "python"
    if path.is_file() and subprocess.run([str(path), "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        return str(path)
    return None


def missing(what: str) -> str:
    """The note a benchmark leaves when its anchor is not built."""
    return f"{what} was not measured: llama.cpp's tools are not built here (`make anchors`, about 20 minutes once)."


def _run(argv: list[str], **kwargs) -> None:
    print("+", " ".join(argv), file=sys.stderr, flush=True)
    subprocess.run(argv, check=True, **kwargs)


def build() -> None:
    folder = home()
    folder.mkdir(parents=True, exist_ok=True)
    sdist = folder / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.exists():
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
              f"llama-cpp-python=={VERSION}", "-d", str(folder)])
    tree = folder / f"llama_cpp_python-{VERSION}"
    if not source().is_dir():
        with tarfile.open(sdist) as archive:
            archive.extractall(folder, filter="data")
    build_dir = folder / "build"
    _run(["cmake", "-S", str(source()), "-B", str(build_dir), "-G", "Ninja", *CMAKE_FLAGS])
    _run(["cmake", "--build", str(build_dir), f"-j{os.cpu_count() or 2}", "--target", *TOOLS])
    # The bindings: llama-cpp-python's package, with the libraries it loads beside it.
    venv = folder / "python"
    if not (venv / "bin" / "python").exists():
        _run([sys.executable, "-m", "venv", str(venv)])
        _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *BINDING_DEPENDENCIES])
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    package = site / "llama_cpp"
    shutil.rmtree(package, ignore_errors=True)
    shutil.copytree(tree / "llama_cpp", package)
    (package / "lib").mkdir(exist_ok=True)
    for library in (build_dir / "bin").glob("*.so*"):
        shutil.copy2(library, package / "lib" / library.name)


def main(argv: list[str]) -> int:
    if argv[:1] == ["build"]:
        build()
    for name in TOOLS:
        print(f"{name}: {tool(name) or 'not built'}")
    print(f"python with llama_cpp: {python() or 'not set up'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
