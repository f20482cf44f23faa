"""Devices by kind (CPU, CUDA, MPS, simulated) and the process's own lifetime."""
