"""The dashboard's widgets, one family per module: devices, placement, links, console, events."""
