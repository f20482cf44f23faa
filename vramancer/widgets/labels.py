"""Names for parts of the model, as the engine writes them.

The engine's `part_label` lives beside the migration code, which imports torch. The widgets
need it only once a plan is on screen, so it is imported then: the dashboard's first frame is
drawn before torch is imported.
"""

from __future__ import annotations


def part_label(first: int | str, last: int | str) -> str:
    """"L0–5", "L7", "embed", "head"."""
    from vramancer.planning.placement import part_label as engine_label

    return engine_label(first, last)
