"""The engine: loading, planning, running, migrating. Never imports the UI.

`Engine` and `LoadOptions` are imported on first use, so that checking a value
(`vramancer.engine.validation`) or catching `VramancerError` does not cost torch's import."""

from vramancer.engine.errors import VramancerError


def __getattr__(name: str):
    if name in ("Engine", "LoadOptions"):
        from vramancer.engine import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'vramancer.engine' has no attribute {name!r}")


__all__ = ["Engine", "LoadOptions", "VramancerError"]
