"""Where a setting's value comes from: a flag, else its VRM_* variable, else the config file,
else the default — one path for every value, each checked by the same sentence wherever it
came from (a refusal names the variable, or the file and its key).

The config file is TOML at `<user config folder>/vramancer/config.toml` (platformdirs), or
wherever VRM_CONFIG points. Its keys are the variables' names without `VRM_`, in lower case:

    devices = "cuda:0,cuda:1=10GiB,cpu"
    weights = "q4"
    context = 4096
    api_key_file = "~/.config/vramancer/key"

`vramancer config` prints every setting's value and where it came from. No torch here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vramancer.config.errors import VramancerError
from vramancer.config.files import read_regular

CONFIG_ENV = "VRM_CONFIG"

# Every setting a user may keep in the file or the environment, with its default. Secrets (the
# cluster token, API keys) stay in files of their own: the file names them, never holds them.
MAX_CONFIG_BYTES = 1 << 20  # a few settings; never read a huge or endless file

DEFAULTS: dict[str, str] = {
    "model": "default",
    "devices": "auto",
    "discover": "",
    "token_file": "",
    "strategy": "proportional",
    "context": "2048",
    "dtype": "auto",
    "weights": "auto",
    "threads": "0",
    "auto_rebalance": "",
    "cuda_graphs": "auto",
    "host": "127.0.0.1",
    "port": "8000",
    "api_key_file": "",
    "max_batch": "8",
    "max_connections": "1024",
    "keep_alive_seconds": "5",
    "header_seconds": "10",
    "body_seconds": "30",
    "drain_seconds": "5",
    "cors_origins": "",
    "allow_hosts": "",
    "node_devices": "auto",
    "node_bind": "127.0.0.1",
    "node_port": "7070",
    "node_lease": "30",  # seconds a node waits on a silent coordinator (cluster/protocol.py)
    "discover_bind": "127.0.0.1",
    "discover_seconds": "3",
    "cache_dir": "",
    "kernel_dir": "",
    "cpu_kernels": "on",
    "host_tier": "",
    "disk_tier": "",
}


@dataclass(frozen=True)
class Setting:
    name: str  # the file's key; the variable is VRM_<NAME>
    value: str
    source: str  # "VRM_<NAME>", the config file's path, or "default"


def config_path() -> Path:
    """The config file's path (it need not exist)."""
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("vramancer")) / "config.toml"


def file_values(path: Path | None = None) -> dict[str, str]:
    """The config file's settings as text (a missing file holds none); a file that cannot be
    read, is not TOML, or names an unknown key is refused in one sentence."""
    path = path or config_path()
    if not os.path.lexists(path):
        return {}
    data = read_regular(path, "the config file", MAX_CONFIG_BYTES)  # a FIFO is refused, not waited on
    if len(data) > MAX_CONFIG_BYTES:
        raise VramancerError(f"the config file {path} is larger than {MAX_CONFIG_BYTES >> 20} MiB; it holds a few settings.")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise VramancerError(f"the config file {path} is not valid TOML ({str(exc).splitlines()[0]}).") from None
    values = {}
    for key, value in table.items():
        if key not in DEFAULTS:
            raise VramancerError(f"the config file {path} has an unknown setting '{key}'; "
                                 f"known: {', '.join(sorted(DEFAULTS))}.")
        if isinstance(value, bool):
            value = "1" if value else ""
        elif isinstance(value, list):
            value = ",".join(str(item) for item in value)
        elif not isinstance(value, (str, int, float)):
            raise VramancerError(f"the config file {path} sets '{key}' to a table; give it text or a number.")
        values[key] = str(value)
    return values


_READ: dict[Path, tuple[tuple, dict[str, str]]] = {}  # each file's stamp and settings, read once per change


def _stamp(path: Path) -> tuple:
    try:
        stat = path.stat()
    except OSError:
        return ()
    return stat.st_mtime_ns, stat.st_size


def lookup(name: str) -> Setting:
    """A setting from VRM_<NAME>, else the config file, else its default."""
    variable = f"VRM_{name.upper()}"
    if os.environ.get(variable) is not None:
        return Setting(name, os.environ[variable], variable)
    path = config_path()
    stamp = _stamp(path)
    if path not in _READ or _READ[path][0] != stamp:
        _READ[path] = (stamp, file_values(path))
    found = _READ[path][1]
    if name in found:
        return Setting(name, found[name], str(path))
    return Setting(name, DEFAULTS.get(name, ""), "default")


def value(name: str) -> str:
    return lookup(name).value


def where(name: str) -> str:
    """How a refusal names the source of a value: the variable, or the key in the file."""
    setting = lookup(name)
    if setting.source == "default":
        return f"the default {name}"
    if setting.source.startswith("VRM_"):
        return setting.source
    return f"'{name}' in {setting.source}"


def every_setting() -> list[Setting]:
    return [lookup(name) for name in DEFAULTS]
