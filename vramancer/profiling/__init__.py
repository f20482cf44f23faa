"""Measured timings of layers and links, and their cache."""
