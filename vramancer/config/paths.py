"""Where VRAMancer keeps what it derives once and reuses (GGUF pieces, timings, compiled
kernels): one folder, VRM_CACHE_DIR or the platform's user cache folder."""

from __future__ import annotations

from pathlib import Path

from vramancer.config import settings
from vramancer.config.errors import VramancerError

CACHE_ENV = "VRM_CACHE_DIR"


def cache_root() -> Path:
    """VRM_CACHE_DIR (or the config file's cache_dir) if set, else the platform's user cache folder for vramancer."""
    override = settings.value("cache_dir")
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("vramancer"))


def check_cache_root() -> None:
    """Refuse a cache folder no cache could live in: a path the file system will not take (too
    long), a parent this user may not search, or a file in its place. One that does not exist
    yet is made when first written."""
    root = cache_root()
    where = settings.where("cache_dir")
    shown = str(root) if len(str(root)) <= 80 else f"{str(root)[:40]}…{str(root)[-30:]} ({len(str(root))} characters)"
    hint = "set VRM_CACHE_DIR to a folder you can write" if where.startswith("the default") else f"change {where}"
    try:
        is_folder = root.is_dir() or not root.exists()
    except OSError as exc:
        raise VramancerError(f"the cache folder {shown} cannot be used: {exc.strerror or exc}; {hint}.") from None
    if not is_folder:
        raise VramancerError(f"the cache folder {shown} is a file, not a folder; {hint}.")
