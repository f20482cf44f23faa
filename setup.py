"""Our CPU kernels, compiled as part of the package when torch can be imported while it builds.

Everything else about the package is in pyproject.toml. torch is deliberately not a build
requirement: under pip's build isolation that would download torch (its CUDA build, several GB)
into a throwaway environment. So an isolated build makes a package without the kernels (they are
then compiled on first use, kernels/cpu/build.py), and `make setup` builds with
`--no-build-isolation` after installing the CPU torch, which compiles them here.
Set VRM_BUILD_KERNELS=0 to skip them even then.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def kernel_identity():
    """kernels/cpu/identity.py, loaded by its path: importing the package would need its
    dependencies, which are not installed yet while it builds."""
    path = HERE / "vramancer" / "kernels" / "cpu" / "identity.py"
    spec = importlib.util.spec_from_file_location("vramancer_kernel_identity", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernel_extensions() -> dict:
    if os.environ.get("VRM_BUILD_KERNELS", "1").strip().lower() in ("0", "off", "no", "false"):
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return {}  # an isolated build: the kernels are compiled on first use instead
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return {}
    identity = kernel_identity()

    class BuildKernels(BuildExtension):
        """torch's builder, then a key file beside each module naming the torch and Python it
        was built for (kernels/cpu/build.py uses the module only when they match). Beside it
        means in the wheel's tree, or in the source tree for an editable install."""

        def run(self):
            super().run()
            for extension in self.extensions:
                built = Path(self.get_ext_fullpath(extension.name))
                stamp = {"key": identity.build_key(torch.__version__), "bytes": built.stat().st_size}
                built.with_name(f"{identity.NAME}.key").write_text(json.dumps(stamp))

    sources = [str(path.relative_to(HERE)) for path in identity.sources()]
    # -g0: the debug info Python's own CFLAGS ask for would make the module ten times larger.
    extension = CppExtension(f"vramancer.kernels.cpu.{identity.NAME}", sources,
                             extra_compile_args=[*identity.FLAGS, "-g0"])
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildKernels}}


setup(**kernel_extensions())
