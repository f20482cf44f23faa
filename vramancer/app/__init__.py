"""The Textual dashboard: the App, its screens, bindings and command palette entries."""

from vramancer.app.app import VramancerApp, run_dashboard

__all__ = ["VramancerApp", "run_dashboard"]
