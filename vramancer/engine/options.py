"""What to load and where: the options a Load command and `Engine.load` share, as plain data."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoadOptions:
    model: str = "default"
    devices: str = "auto"
    strategy: str = "proportional"
    context: int = 2048
    dtype: str = "auto"
    auto_rebalance: bool = False
    token_file: str | None = None  # the cluster token for remote devices (else VRM_CLUSTER_TOKEN)
