# Makes the repository root importable (contextpose_jax, data_prep, weights_conversion).
