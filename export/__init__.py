"""Export formats, one module per format (installed as ``kvant.export``)."""
