"""Quantized weight formats (q8 rows, q4 blocks) and turning a model's weights into them."""
