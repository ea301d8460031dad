"""Quantization methods, one module per method (installed as ``kvant.quantize``)."""
