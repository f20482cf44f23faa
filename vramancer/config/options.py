"""What to load and how: plain data, importable without torch (the dashboard builds these
before its first frame, long before the engine is imported)."""

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
    weights: str = "auto"  # auto | native | q8 | q4: how weights are held (quantization/weights.py)
    # auto | on | off: decode steps of CUDA layers replayed from graphs (runtime/graphs.py);
    # auto is on wherever a layer can sit on a CUDA device and the model runs from a static cache
    cuda_graphs: str = "auto"
    # Caps of the host and disk tiers (config/tiers.py), as written: "" or 0 for none.
    host_tier: str = ""
    disk_tier: str = ""

    def check(self) -> None:
        """VramancerError for a value that is wrong on its own, before anything loads (the CLI
        and the dashboard call this; loading checks the same again)."""
        from vramancer.config.device_spec import parse_device_spec
        from vramancer.config.validation import (
            check_context,
            check_cuda_graphs,
            check_weights,
        )

        check_context(self.context)
        check_weights(self.weights)
        check_cuda_graphs(self.cuda_graphs)
        parse_device_spec(self.devices)
        self.tier_caps()

    def tier_caps(self) -> dict[str, int]:
        """Bytes each tier may hold (0: no such tier); a bad size is refused in one sentence."""
        from vramancer.config.tiers import tier_size

        return {"host": tier_size(self.host_tier, "--host-tier"), "disk": tier_size(self.disk_tier, "--disk-tier")}
