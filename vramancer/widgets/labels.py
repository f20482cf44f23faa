"""Names for parts of the model, as the engine writes them; text as a terminal can draw it.

The engine's `part_label` lives beside the migration code, which imports torch. The widgets
need it only once a plan is on screen, so it is imported then: the dashboard's first frame is
drawn before torch is imported.
"""

from __future__ import annotations


def part_label(first: int | str, last: int | str) -> str:
    """"L0–5", "L7", "embed", "head"."""
    from vramancer.planning.placement import part_label as engine_label

    return engine_label(first, last)


# Characters whose width terminals and Rich disagree on: a skin-tone modifier, the joiner of an
# emoji sequence and the emoji-presentation selector. Rich counts 👍🏽 as four cells, a terminal
# draws two, so every cell after it on the line lands two to the left and the panel's right
# border breaks until the screen is redrawn. Without them each character is drawn alone, at the
# width both agree on (👍🏽 shows as 👍).
_WIDTH_AMBIGUOUS = dict.fromkeys([*range(0x1F3FB, 0x1F400), 0x200D, 0xFE0F])


def terminal_safe(text: str) -> str:
    """`text` as the console draws it: what a terminal and Rich agree on the width of."""
    return text.translate(_WIDTH_AMBIGUOUS)
