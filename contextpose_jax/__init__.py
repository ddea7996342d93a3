"""contextpose-jax: Context-Aware PoseFormer (CA-PF) in JAX/Flax."""
