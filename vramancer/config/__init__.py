"""Options, validation, the device spec grammar, units and errors: plain data, no torch."""
