"""Flax modules of CA-PF: backbones, context sampler, lifter, full model."""

# The backbone names (and this package's import) need no jax: the commands
# list them in their flags before any heavy import.

# The frozen 2D-pose backbones CA-PF was released with (the one list of them).
HRNET_WIDTHS = {'hrnet_32': 32, 'hrnet_48': 48}
BACKBONES = (*HRNET_WIDTHS, 'cpn')

# The model config's `matmul_precision` (the precision policy, docs/benchmarks.md):
# 'default' is the backend's fastest (TF32 / bf16 passes).
MATMUL_PRECISIONS = ("highest", "high", "default")


def matmul_precision(name: str):
  """'highest' | 'high' | 'default' -> the ``precision`` of jnp.dot / einsum."""
  if name not in MATMUL_PRECISIONS:
    raise ValueError(f"matmul_precision must be one of {tuple(MATMUL_PRECISIONS)}, "
                     f"got {name!r}")
  import jax  # pylint: disable=g-import-not-at-top
  return {"highest": jax.lax.Precision.HIGHEST, "high": jax.lax.Precision.HIGH,
          "default": None}[name]
