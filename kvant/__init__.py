"""Kvant: quantization and export toolkit for NorMistral-11b-long.

Nothing heavy is imported here, so that ``kvant --help`` stays instant.
"""

__version__ = "0.1.0"

DEFAULT_MODEL = "norallm/normistral-11b-long"
