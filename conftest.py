# Makes the repository root importable (contextpose_jax, data_prep, weights_conversion).

# The commands' malloc settings for the test process too (contextpose_jax/
# host_memory.py): before any test starts JAX's backend.
from contextpose_jax import host_memory  # pylint: disable=g-bad-import-order,wrong-import-position

host_memory.configure()
