"""The engine: loading, planning, running, migrating. Never imports the UI."""

from vramancer.engine.engine import Engine, LoadOptions
from vramancer.engine.errors import VramancerError

__all__ = ["Engine", "LoadOptions", "VramancerError"]
