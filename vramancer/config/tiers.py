"""The host and disk tiers' caps: `--host-tier SIZE`, `--disk-tier SIZE`, their VRM_* variables
and config keys. Empty, 0 or off: no tier. No torch, so a bad size is refused at once."""

from __future__ import annotations

from vramancer.config import settings
from vramancer.config.errors import VramancerError
from vramancer.config.units import parse_size

TIERS = ("host", "disk")
OFF = ("", "0", "off", "none")


def tier_size(text: str, source: str) -> int:
    """Bytes of a tier cap written as `text`, which came from `source` (a flag, a variable or a
    config key, named in the refusal); 0 for no tier."""
    if text.strip().lower() in OFF:
        return 0
    try:
        return parse_size(text)
    except VramancerError as exc:
        raise VramancerError(f"{source} {str(exc)[:-1]}, or 0 for no tier.") from None


def tier_setting(tier: str, flag_value: str | None) -> int:
    """The cap of `tier` (host or disk): the flag's value when given, else its variable or config key."""
    if flag_value is not None:
        return tier_size(flag_value, f"--{tier}-tier")
    name = f"{tier}_tier"
    return tier_size(settings.value(name), settings.where(name))
