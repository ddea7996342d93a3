"""Fusion barriers for XLA:CPU: make XLA write a value to memory once.

XLA:CPU duplicates cheap elementwise producers into every fusible consumer.
That is right for one consumer and badly wrong for some of ours: a feature
map's producer (a backbone's last residual adds, upsamplings, BatchNorm
biases) fused into every corner gather of every sampler call is recomputed per
gathered row, and a residual stream (HRNet's branches, the lifter's blocks,
and the lifter's cotangents in the backward) fused into every later block
re-reads every earlier block's outputs: quadratic memory traffic.
``optimization_barrier`` does not stop it (XLA:CPU removes it before fusion),
nor does a divide by a runtime 1 (rewritten to a multiply). Two constructs
do, both exact:

- ``through_identity_conv``: a 1x1 convolution by the identity. Convolutions
  are never fused; it costs C^2 multiply-adds per pixel, so it suits narrow
  maps inside a conv net (HRNet, ~1% of its FLOPs).
- ``materialized``: a while loop whose trip count XLA cannot know (0 at run
  time: the loop runs once only if the value's first element is NaN, and its
  body is the identity then too). A loop's operand is a buffer, read where it
  lies by every consumer of the loop's result; no arithmetic, no copy when the
  value has no other consumer.

Both act only in programs compiled for a CPU
(``compiler_options.target_platform()``, the platform of the program's
devices, not the host's); in a GPU or TPU program they return ``x``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from contextpose_jax import compiler_options


def _on_cpu() -> bool:
  return compiler_options.target_platform() == "cpu"


def through_identity_conv(x):
  """``x`` (NHWC); on CPU through an identity 1x1 convolution (exact: fp32 and
  bf16 CPU convolutions multiply by 1 exactly). Not elsewhere: a
  default-precision convolution may round there (TF32)."""
  if not _on_cpu():
    return x
  eye = jnp.eye(x.shape[-1], dtype=x.dtype)[None, None]
  return jax.lax.conv_general_dilated(x, eye, (1, 1), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_vjp
def _loop_barrier(x):
  first = x.reshape(-1)[0]
  trips = (first != first).astype(jnp.int32)  # 1 only for a NaN

  def body(state):
    i, value = state
    # Never changes ``value`` (i >= 0), but XLA cannot prove it, so the loop
    # stays and so does its operand buffer.
    return i + 1, jnp.where(i < 0, jnp.zeros_like(value), value)

  return jax.lax.while_loop(lambda state: state[0] < trips, body, (jnp.int32(0), x))[1]


# The identity's gradient (a while loop has no reverse-mode rule of its own),
# itself materialized: the backward's residual stream of cotangents chains
# through the same adds as the forward's.
_loop_barrier.defvjp(lambda x: (_loop_barrier(x), None), lambda _, g: (_loop_barrier(g),))


def materialized(x):
  """``x`` itself; on CPU, written once to memory and read from there by all
  its consumers (see the module docstring). Apply it once per value: each
  barrier on the same value is a loop of its own, and XLA copies the value
  for each loop beyond the first."""
  if not _on_cpu() or x.size == 0 or not jnp.issubdtype(x.dtype, jnp.inexact):
    return x
  return _loop_barrier(x)
