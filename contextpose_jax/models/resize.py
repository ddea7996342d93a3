"""Bilinear resizing with torch's `align_corners=True` semantics.

`jax.image.resize` samples at pixel centres (align_corners=False). The official
CPN upsamples with `nn.Upsample(..., mode='bilinear', align_corners=True)`,
which maps the corner pixels of input and output onto each other: output index
i reads input position i * (in - 1) / (out - 1). Because the resize is
separable, it is two small interpolation matrices applied with einsum: exact,
differentiable, and cheap next to the convolutions around it.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def interpolation_matrix(in_size: int, out_size: int,
                         dtype=np.float32) -> np.ndarray:
  """(out_size, in_size) matrix of 1-D linear interpolation, align_corners=True.

  Each row holds at most two non-zero weights, (1 - frac) and frac, at the two
  neighbours of the source position, like torch's upsample kernels. Torch uses
  a scale of 0 when out_size == 1 (every output reads input index 0) and a
  source of 0 when in_size == 1; both fall out of the formula below.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(
        f'resize: sizes must be >= 1, got in={in_size}, out={out_size}')
  # Torch computes source positions in the input's precision (float32 for
  # float32 and bf16 inputs, float64 for float64 ones).
  scale = dtype(in_size - 1) / dtype(out_size - 1) if out_size > 1 else dtype(0)
  src = scale * np.arange(out_size, dtype=dtype)
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo.astype(dtype)
  matrix = np.zeros((out_size, in_size), dtype)
  rows = np.arange(out_size)
  matrix[rows, lo] += 1.0 - frac
  matrix[rows, hi] += frac  # hi == lo only where frac == 0
  return matrix


def resize_bilinear_align_corners(
    x: jax.Array, out_hw: Sequence[int],
    precision: jax.lax.Precision | None = jax.lax.Precision.HIGHEST) -> jax.Array:
  """Resizes NHWC `x` to `out_hw` like `F.interpolate(..., 'bilinear',
  align_corners=True)`; the result keeps `x.dtype`.

  An axis whose size does not change is left untouched (exact identity).
  `precision` of the two interpolation matmuls: HIGHEST (the parity setting)
  by default; on GPU/TPU a lower one may round them to TF32/bf16 (see
  `lifter.matmul_precision`).
  """
  if x.ndim != 4:
    raise ValueError(f'resize: expected an NHWC array, got shape {x.shape}')
  if len(out_hw) != 2:
    raise ValueError(f'resize: out_hw must be (height, width), got {out_hw}')
  out_h, out_w = (int(s) for s in out_hw)
  _, in_h, in_w, _ = x.shape
  dtype = np.float64 if x.dtype == jnp.float64 else np.float32
  # Width first, then height: the order torch's kernel blends the 4 taps in.
  if out_w != in_w:
    mw = jnp.asarray(interpolation_matrix(in_w, out_w, dtype), x.dtype)
    x = jnp.einsum('nhwc,vw->nhvc', x, mw, precision=precision)
  if out_h != in_h:
    mh = jnp.asarray(interpolation_matrix(in_h, out_h, dtype), x.dtype)
    x = jnp.einsum('nhwc,uh->nuwc', x, mh, precision=precision)
  return x
