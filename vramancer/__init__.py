"""VRAMancer: split one language model across several accelerators and steer the split live."""

__version__ = "0.1.0"
