"""Benchmarks of artifacts: memory, speed, perplexity drift (installed as ``kvant.bench``)."""
