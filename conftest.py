# Makes the repository root importable (contextpose_jax, data_prep, weights_conversion).

# What the commands do before JAX starts, for the test process too: no TPU or
# GPU backend where none is attached (contextpose_jax/host_devices.py; the test
# set installs libtpu to compile TPU programs), and the malloc settings
# (contextpose_jax/host_memory.py).
from contextpose_jax import host_devices  # pylint: disable=g-bad-import-order,wrong-import-position
from contextpose_jax import host_memory  # pylint: disable=g-bad-import-order,wrong-import-position

host_devices.skip_absent_backends()
host_memory.configure()
