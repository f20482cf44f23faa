"""Turning requests into decode steps: generation, the server's batch, KV room."""
