"""Command palette entries: load another model, re-plan, export metrics, and a few more."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Callable

from textual.command import DiscoveryHit, Hit, Hits, Provider

if TYPE_CHECKING:
    from vramancer.app.app import VramancerApp


class DashboardCommands(Provider):
    """The dashboard's own commands, found by fuzzy search in ctrl+p."""

    def _commands(self) -> list[tuple[str, Callable[[], object], str]]:
        from vramancer.planning.placement import (
            STRATEGIES,  # the palette opens once the engine is imported
        )

        app: VramancerApp = self.app  # type: ignore[assignment]
        commands: list[tuple[str, Callable[[], object], str]] = [
            ("Load another model…", app.action_load_model, "Pick a model, devices, strategy and context, and load it"),
        ]
        for strategy in STRATEGIES:
            commands.append((f"Re-plan: {strategy}", partial(app.replan, strategy),
                             f"Place the model afresh with the {strategy} strategy and move what must move"))
        for device in app.loaded.devices if app.loaded else ():
            if device.simulated:
                commands.append((f"Squeeze {device.name}", partial(app.squeeze, device.name),
                                 f"Simulate another process taking {device.name}'s free memory and half the model's share"))
                commands.append((f"Release {device.name}", partial(app.squeeze, device.name, True),
                                 f"Give back what the simulated other process took on {device.name}"))
        commands += [
            ("Export metrics (JSON)", app.action_export_metrics,
             "Write telemetry history, plan, links and migrations to a JSON file in the working directory"),
            ("New conversation", app.action_new_conversation, "Forget the earlier turns of the conversation"),
            ("Help", app.action_help, "Keys, panels and how to drag layers between devices"),
        ]
        return commands

    async def discover(self) -> Hits:
        for name, callback, help_text in self._commands():
            yield DiscoveryHit(name, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, callback, help_text in self._commands():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), callback, help=help_text)
