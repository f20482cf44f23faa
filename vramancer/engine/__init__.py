"""The engine: loading, planning, running, migrating. Never imports the UI.

`Engine` and `LoadOptions` are imported on first use (PEP 562), so light modules of the engine
(units, errors, options, validation) can be imported without torch: checking a value costs no
torch import, and the dashboard draws its first frame before the heavy imports start.
"""

from vramancer.config.errors import VramancerError


def __getattr__(name: str):
    if name == "Engine":
        from vramancer.engine.engine import Engine

        return Engine
    if name == "LoadOptions":
        from vramancer.config.options import LoadOptions

        return LoadOptions
    raise AttributeError(f"module 'vramancer.engine' has no attribute {name!r}")


__all__ = ["Engine", "LoadOptions", "VramancerError"]
