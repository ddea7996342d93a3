"""The device mesh and the shardings of the data-parallel step.

One 1-D mesh over every device of every process: the global batch is split
over its 'data' axis (`NamedSharding(mesh, P('data'))`), the train state is
replicated, and XLA inserts the gradient all-reduce. The same code runs on one
CPU, N GPUs, a TPU slice or several hosts.
"""
from __future__ import annotations

from typing import Mapping

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from contextpose_jax import compiler_options

DATA_AXIS = 'data'


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D data-parallel mesh over every device of every process (or `devices`).

  Auto axes: the compiler propagates the batch sharding through the model
  (newer JAX defaults `make_mesh` to Explicit axes, which would require
  sharding annotations on every gather of the context sampler).
  """
  auto = (jax.sharding.AxisType.Auto,)
  if devices is None:
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=auto)
  return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=auto)


def platform(mesh) -> str:
  """'cpu', 'gpu' or 'tpu': where the mesh's programs run (its devices decide,
  also for compile-only devices of another platform than the host's)."""
  return compiler_options.of_devices(mesh.devices.flat)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: Mapping[str, np.ndarray], mesh) -> dict:
  """Host-local numpy batch (this host's rows) -> globally sharded jax.Arrays."""
  sharding = batch_sharding(mesh)
  out = {}
  for k, v in local_batch.items():
    v = np.asarray(v)
    if v.dtype.kind not in 'biuf':
      continue  # strings (e.g. names) stay on the host
    out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out
