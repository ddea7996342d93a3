"""The context sampler: bilinear sampling of NHWC feature maps.

Semantics are those of ``torch.nn.functional.grid_sample(mode='bilinear',
align_corners=True)``, which the official CA-PF uses for both the reference
features (padding 'zeros') and the deformable samples (padding 'border').
Gradients w.r.t. the maps and w.r.t. the coordinates equal torch's: they are
torch's backward formulas, written out in a custom VJP. Out-of-map corners
contribute 0 (and so do their weight derivatives), and in 'border' mode the
coordinate is clipped first with torch's gradient convention (1 strictly
inside the map, 0 outside *and on its edges*; ``jnp.clip`` would differ there).

Why this formulation (measured on XLA:CPU, batch 64, 17x16 points on the four
HRNet-W32 maps; ``python -m benchmarks.speed --rows=sampler``):
- Forward: one row gather of the flattened (B*H*W, C) map per corner, blended
  in the same fusion, so only the output is written. A single gather of all
  4 corners followed by a weighted reduction (or an einsum over the corner
  axis) materialises 4x the output and was 7x slower. No loop: a map whose
  producer is cheap elementwise work must be materialized by its caller, or
  XLA fuses that producer into every gather (``CAPF.features`` does it, see
  materialize.py); a loop over the batch did the same job but cost 40% of
  the sampler's own time.
- Backward: memory traffic, not arithmetic, is the cost. Differentiating the
  gathers materialises (B, N, 4, C) updates and gathered rows -- tens of MB
  of fresh buffers per call, on the 16x12 and 8x6 maps 5-10x slower than
  the work itself. The custom VJP recomputes the corners (no big residuals)
  and runs the backward over chunks of the batch (``_chunk_size``), so its
  temporaries stay in cache: the map gradient is one scatter-add over the
  combined corner indices, the point gradient is analytic from the 4 corner
  rows.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from contextpose_jax.models import materialize

PADDING_MODES = ("zeros", "border")
# The backward splits the batch into about this many chunks (_chunk_size).
_CHUNKS = 8
# Corner offsets (dy, dx), in torch's order: nw, ne, sw, se.
_CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))


def _unnormalize(coord, size: int):
  # align_corners=True: -1 and +1 are the centres of the first/last pixels.
  return (coord + 1.0) * (0.5 * (size - 1))


def _clip_like_torch(x, size: int):
  # torch's clip_coordinates_set_grad: value clipped; the gradient is 0 on
  # the edges too (torch treats them as out of bounds), 1 strictly inside.
  return jnp.where(x <= 0, jnp.zeros_like(x),
                   jnp.where(x >= size - 1, jnp.full_like(x, size - 1), x))


def _corners(coords, h: int, w: int, padding_mode: str):
  """Pixel positions (x, y), fractions (fx, fy) and, per corner, the row of
  the flattened (B*H*W, C) map (clipped into range) and whether it is inside."""
  b = coords.shape[0]
  x = _unnormalize(coords[..., 0], w)
  y = _unnormalize(coords[..., 1], h)
  if padding_mode == "border":
    x, y = _clip_like_torch(x, w), _clip_like_torch(y, h)
  x0, y0 = jnp.floor(x), jnp.floor(y)
  fx, fy = x - x0, y - y0
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  first_row = (jnp.arange(b, dtype=jnp.int32) * (h * w))[:, None]
  corners = []
  for dy, dx in _CORNERS:
    cx, cy = x0 + dx, y0 + dy
    inside = (cx >= 0) & (cx <= w - 1) & (cy >= 0) & (cy <= h - 1)
    row = jnp.clip(cy, 0, h - 1) * w + jnp.clip(cx, 0, w - 1) + first_row
    corners.append((row, inside))
  return fx, fy, corners


def _bilinear_weights(fx, fy):
  return ((1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy)


def _rows(flat_map, row):
  # Every row index is in range already ('clip' costs nothing then).
  return jnp.take(flat_map, row.reshape(-1), axis=0, mode="clip").reshape(
      *row.shape, flat_map.shape[-1])


def _chunk_size(b: int) -> int:
  """Examples per backward chunk: the largest divisor of ``b`` up to
  ``b / _CHUNKS``, so the (chunk, points, channels) temporaries stay in cache
  and every chunk has the same shape (one loop body)."""
  return max(d for d in range(1, -(-b // _CHUNKS) + 1) if b % d == 0)


def _over_batch_chunks(fn, chunk: int, *arrays):
  """``fn(*arrays)``, run over chunks of the batch (axis 0) with ``lax.map``."""
  b = arrays[0].shape[0]
  if chunk == b:
    return fn(*arrays)
  split = lambda a: a.reshape(b // chunk, chunk, *a.shape[1:])
  merge = lambda a: a.reshape(b, *a.shape[2:])
  return jax.tree.map(merge, jax.lax.map(lambda args: fn(*args), tuple(map(split, arrays))))


def _blend(padding_mode, feature_map, coords):
  """The forward: 4 corner gathers blended in one fusion."""
  b, h, w, c = feature_map.shape
  fx, fy, corners = _corners(coords, h, w, padding_mode)
  flat_map = feature_map.reshape(b * h * w, c)
  out = None
  # Torch's sum order: nw + ne + sw + se.
  for weight, (row, inside) in zip(_bilinear_weights(fx, fy), corners):
    weight = jnp.where(inside, weight, 0).astype(feature_map.dtype)
    term = weight[..., None] * _rows(flat_map, row)
    out = term if out is None else out + term
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _sample(feature_map, coords, padding_mode):
  # The points written once as well: fused into the gathers, their producer
  # (the deformable offsets' tanh, ...) is recomputed for every channel.
  return _blend(padding_mode, feature_map, materialize.materialized(coords))


def _sample_fwd(feature_map, coords, padding_mode):
  return _sample(feature_map, coords, padding_mode), (feature_map, coords)


def _backward(padding_mode, feature_map, coords, g):
  """Cotangents of the map and the coordinates for one chunk of the batch."""
  b, h, w, c = feature_map.shape
  fx, fy, corners = _corners(coords, h, w, padding_mode)
  flat_map = feature_map.reshape(b * h * w, c)

  rows = jnp.stack([row for row, _ in corners], axis=-1).reshape(-1)
  weights = jnp.stack([jnp.where(inside, weight, 0) for weight, (_, inside)
                       in zip(_bilinear_weights(fx, fy), corners)], axis=-1)
  updates = weights.astype(g.dtype)[..., None] * g[:, :, None, :]  # (B, N, 4, C)
  d_map = jnp.zeros_like(flat_map).at[rows].add(
      updates.reshape(-1, c), mode="promise_in_bounds").reshape(feature_map.shape)

  # d out / d (corner weight k) = <g, corner value k>; then torch's chain
  # through the weights (1 - fx)(1 - fy), fx(1 - fy), (1 - fx)fy, fx fy.
  d_w = [jnp.where(inside, jnp.sum(g * _rows(flat_map, row), axis=-1), 0)
         .astype(fx.dtype) for row, inside in corners]
  d_x = ((d_w[1] - d_w[0]) * (1 - fy) + (d_w[3] - d_w[2]) * fy) * (0.5 * (w - 1))
  d_y = ((d_w[2] - d_w[0]) * (1 - fx) + (d_w[3] - d_w[1]) * fx) * (0.5 * (h - 1))
  if padding_mode == "border":
    x = _unnormalize(coords[..., 0], w)
    y = _unnormalize(coords[..., 1], h)
    d_x = jnp.where((x > 0) & (x < w - 1), d_x, 0)
    d_y = jnp.where((y > 0) & (y < h - 1), d_y, 0)
  return d_map, jnp.stack([d_x, d_y], axis=-1).astype(coords.dtype)


def _sample_bwd(padding_mode, residuals, g):
  feature_map, coords = residuals
  return _over_batch_chunks(functools.partial(_backward, padding_mode),
                            _chunk_size(g.shape[0]), feature_map, coords, g)


_sample.defvjp(_sample_fwd, _sample_bwd)


def grid_sample(feature_map: jax.Array, coords: jax.Array,
                padding_mode: str = "zeros") -> jax.Array:
  """Samples ``feature_map`` at normalized ``coords``.

  Args:
    feature_map: (B, H, W, C).
    coords: (B, ..., 2), (x, y) in [-1, 1] (align_corners=True convention);
      any number of point axes between batch and the last.
    padding_mode: 'zeros' or 'border', as in torch.

  Returns:
    (B, ..., C) bilinear samples, in the dtype of ``feature_map``.
  """
  if padding_mode not in PADDING_MODES:
    raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
  b, _, _, c = feature_map.shape
  point_shape = coords.shape[1:-1]
  # float32 at least (bf16 coordinates would be off by pixels); float64 stays.
  coords = coords.reshape(b, -1, 2)
  coords = coords.astype(jnp.promote_types(coords.dtype, jnp.float32))
  return _sample(feature_map, coords, padding_mode).reshape(b, *point_shape, c)
