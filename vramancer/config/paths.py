"""Where VRAMancer keeps what it derives once and reuses (GGUF pieces, timings, compiled
kernels): one folder, VRM_CACHE_DIR or the platform's user cache folder."""

from __future__ import annotations

from pathlib import Path

from vramancer.config import settings

CACHE_ENV = "VRM_CACHE_DIR"


def cache_root() -> Path:
    """VRM_CACHE_DIR (or the config file's cache_dir) if set, else the platform's user cache folder for vramancer."""
    override = settings.value("cache_dir")
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("vramancer"))
