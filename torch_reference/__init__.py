"""PyTorch re-implementations of the official CA-PF modules, in the official
state-dict key layout. Used as the numerical reference by the parity tests and
by the benchmark; never imported by the JAX code paths (torch is CPU-only)."""
