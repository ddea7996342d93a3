"""Benchmarks: JAX vs the PyTorch reference (speed) and the input pipeline (data_throughput)."""
