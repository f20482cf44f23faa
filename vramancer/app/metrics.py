"""Export metrics: everything the dashboard knows about a run, as one JSON file."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vramancer.engine import events as ev


def plan_json(plan: ev.PlanSnapshot) -> dict:
    return {
        "strategy": plan.strategy,
        "context": plan.context,
        "embed_device": plan.embed,
        "head_device": plan.head,
        "placement": [
            {"first_layer": b.first_layer, "last_layer": b.last_layer, "device": b.device, "bytes": b.bytes}
            for b in plan.blocks
        ],
        "needs": dict(plan.needs),
    }


def metrics_document(
    loaded: ev.Loaded | None,
    plan: ev.PlanSnapshot | None,
    links: tuple[ev.LinkSnapshot, ...],
    migrations: list[ev.MigrationDone],
    history: dict,
) -> dict:
    """The run as plain data: model, devices, plan, links, migrations and telemetry history."""
    return {
        "exported_at": time.time(),
        "model": loaded.model if loaded else None,
        "dtype": loaded.dtype if loaded else None,
        "simulated": loaded.simulated if loaded else None,
        "devices": [asdict(d) for d in loaded.devices] if loaded else [],
        "plan": plan_json(plan) if plan else None,
        "links": [asdict(link) for link in links],
        "migrations": [dict(asdict(m), gb_per_s=m.gb_per_s) for m in migrations],
        "telemetry": history,
    }


def write_metrics(document: dict, folder: Path | None = None) -> Path:
    """Write `document` to a new timestamped file in `folder` (the working directory by default)."""
    folder = folder or Path.cwd()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = folder / f"vramancer-metrics-{stamp}.json"
    counter = 1
    while path.exists():
        path = folder / f"vramancer-metrics-{stamp}-{counter}.json"
        counter += 1
    path.write_text(json.dumps(document, indent=2, default=str))
    return path
