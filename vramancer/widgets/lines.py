"""A widget drawn as lines of text that repaints only the lines that change.

Textual redraws a whole widget on each `refresh()`: it looks every component style up again
(a refresh empties that cache) and turns every line into segments, then composes every line on
screen. The device cards and link rows take a reading once a second, and a reading mostly
changes one line (a graph gaining a cell) or none. Here the lines are kept, each drawn line is
kept as a strip, a reading repaints only the lines that differ, and a layout happens only when
their number changes. (Textual's own Log widget keeps its lines the same way.)
"""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual.geometry import Region
from textual.reactive import Reactive
from textual.strip import Strip
from textual.visual import Visual, visualize
from textual.widget import Widget


class LineWidget(Widget):
    """Subclasses build their lines in `build_lines(width)` and call `redraw()` when what they
    show may have changed; `rebuild()` when their shape changed (a new mode, new lines)."""

    auto_links = Reactive(False)  # the lines hold no links: no need to look for them in every segment

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._shown: list[Text] | None = None  # the lines as last built, at _shown_width cells
        self._shown_width = -1
        self._strips: dict[int, Strip] = {}  # line number → that line drawn
        self._styles: dict[str, Style] = {}  # component class → its Rich style

    def build_lines(self, width: int) -> list[Text]:
        raise NotImplementedError

    def component_style(self, component: str) -> Style:
        """`get_component_rich_style`, kept until the styles change (a refresh does not)."""
        style = self._styles.get(component)
        if style is None:
            style = self._styles[component] = self.get_component_rich_style(component)
        return style

    def redraw(self) -> None:
        """Build the lines again and repaint those that differ from what is on screen."""
        if not self.display:  # hidden: nothing to repaint; the lines are built when it shows
            self._shown = None
            return
        width = self.content_region.width
        if self._shown is None or width != self._shown_width or not self.is_mounted:
            self.rebuild()  # nothing drawn at this width yet
            return
        lines = self.build_lines(width)
        if len(lines) != len(self._shown):
            self.rebuild(lines)
            return
        changed = [y for y, (old, new) in enumerate(zip(self._shown, lines)) if old != new]
        self._shown = lines
        for y in changed:
            self._strips.pop(y, None)
        if changed:
            self.refresh(*(Region(0, y, width, 1) for y in changed))

    def rebuild(self, lines: list[Text] | None = None) -> None:
        """Forget what was drawn; paint (and lay out) the whole widget again."""
        self._shown = lines
        self._strips.clear()
        self.refresh(layout=True)

    def _lines_at(self, width: int) -> list[Text]:
        if self._shown is None or width != self._shown_width:
            self._shown = self.build_lines(width)
            self._shown_width = width
            self._strips.clear()
        return self._shown

    def get_content_height(self, container, viewport, width: int) -> int:
        return len(self._lines_at(width))

    def render(self) -> Text:
        """The whole widget as one text (what a copy of a selection or a test reads)."""
        return Text("\n").join(self._lines_at(max(self.content_region.width, 1)))

    def render_line(self, y: int) -> Strip:
        width = self.content_region.width
        strip = self._strips.get(y) if width == self._shown_width else None
        if strip is None:
            lines = self._lines_at(width)
            line = lines[y] if y < len(lines) else Text()
            strips = Visual.to_strips(self, visualize(self, line), width, 1, self.visual_style)
            strip = self._strips[y] = strips[0] if strips else Strip.blank(width)
        return strip

    def notify_style_update(self) -> None:
        """New styles (a theme, a class): every colour baked into the lines changes."""
        super().notify_style_update()
        self._styles.clear()
        self._shown = None
        self._strips.clear()

    def selection_updated(self, selection) -> None:
        self._strips.clear()  # the selection is drawn into the strips
        super().selection_updated(selection)
