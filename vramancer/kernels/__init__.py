"""Compiled kernels and the module rewiring that puts a model on them."""
