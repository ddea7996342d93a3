"""The context sampler against torch.nn.functional.grid_sample(align_corners=True)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from contextpose_jax.models import sampler
from contextpose_jax.models.sampler import grid_sample


def _points(rng, b, n, h, w):
  """Points inside, exactly on the edges / pixel centres, and outside the map."""
  inside = rng.uniform(-0.98, 0.98, (b, n, 2))
  # Exact pixel centres, including the four edges (x = +-1, y = +-1).
  gx = np.linspace(-1, 1, w)[rng.integers(0, w, (b, n))]
  gy = np.linspace(-1, 1, h)[rng.integers(0, h, (b, n))]
  on_grid = np.stack([gx, gy], -1)
  edges = np.stack([rng.choice([-1.0, 1.0], (b, n)), rng.uniform(-1, 1, (b, n))], -1)
  outside = rng.uniform(-1.6, 1.6, (b, n, 2))
  far = rng.uniform(3.0, 4.0, (b, n, 2)) * rng.choice([-1.0, 1.0], (b, n, 2))
  return np.concatenate([inside, on_grid, edges, outside, far], axis=1).astype(np.float32)


def _torch_sample(fmap_nhwc, coords, padding_mode):
  fmap = torch.tensor(fmap_nhwc).permute(0, 3, 1, 2).requires_grad_(True)
  grid = torch.tensor(coords)[:, :, None, :].requires_grad_(True)  # (B, N, 1, 2)
  out = F.grid_sample(fmap, grid, mode="bilinear", padding_mode=padding_mode,
                      align_corners=True)[..., 0].permute(0, 2, 1)  # (B, N, C)
  return out, fmap, grid


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("hw", [(8, 6), (16, 12), (1, 5)])
def test_values_and_gradients_match_torch(padding_mode, hw):
  rng = np.random.default_rng(0)
  h, w = hw
  b, c, n = 2, 5, 40
  fmap = rng.normal(size=(b, h, w, c)).astype(np.float32)
  coords = _points(rng, b, n, h, w)
  cotangent = rng.normal(size=(b, coords.shape[1], c)).astype(np.float32)

  out_t, fmap_t, grid_t = _torch_sample(fmap, coords, padding_mode)
  (out_t * torch.tensor(cotangent)).sum().backward()

  def loss(f, g):
    return jnp.sum(grid_sample(f, g, padding_mode) * cotangent)

  out = grid_sample(jnp.asarray(fmap), jnp.asarray(coords), padding_mode)
  d_map, d_coords = jax.grad(loss, argnums=(0, 1))(jnp.asarray(fmap), jnp.asarray(coords))

  np.testing.assert_allclose(out, out_t.detach().numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(d_map, fmap_t.grad.permute(0, 2, 3, 1).numpy(),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(d_coords, grid_t.grad[:, :, 0].numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_batch_chunked_backward_matches_torch(padding_mode, monkeypatch):
  # The backward runs over chunks of the batch; force 3 chunks.
  rng = np.random.default_rng(1)
  b, h, w, c, n = 6, 7, 5, 3, 8
  fmap = rng.normal(size=(b, h, w, c)).astype(np.float32)
  coords = _points(rng, b, n, h, w)
  cotangent = rng.normal(size=(b, coords.shape[1], c)).astype(np.float32)
  monkeypatch.setattr(sampler, "_CHUNKS", 3)
  assert sampler._chunk_size(b) == 2

  out_t, fmap_t, grid_t = _torch_sample(fmap, coords, padding_mode)
  out = jax.jit(functools.partial(grid_sample, padding_mode=padding_mode))(fmap, coords)
  np.testing.assert_allclose(out, out_t.detach().numpy(),
                             rtol=1e-5, atol=1e-5)
  (out_t * torch.tensor(cotangent)).sum().backward()
  d_map, d_coords = jax.jit(jax.grad(
      lambda f, g: jnp.sum(grid_sample(f, g, padding_mode) * cotangent), argnums=(0, 1)))(
          jnp.asarray(fmap), jnp.asarray(coords))
  np.testing.assert_allclose(d_map, fmap_t.grad.permute(0, 2, 3, 1).numpy(),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(d_coords, grid_t.grad[:, :, 0].numpy(), rtol=1e-4, atol=1e-4)


def test_extra_point_axes_and_exact_pixels():
  # A map whose value is its own x pixel index: sampling at normalized x gives
  # (x + 1) / 2 * (W - 1) exactly, for any number of point axes.
  h, w = 4, 7
  fmap = np.broadcast_to(np.arange(w, dtype=np.float32)[None, None, :, None], (1, h, w, 1))
  coords = np.array([[[[-1.0, 0.0], [1.0, 0.0]], [[0.0, -1.0], [1 / 3, 0.5]]]], np.float32)
  out = grid_sample(jnp.asarray(fmap), jnp.asarray(coords), "zeros")
  assert out.shape == (1, 2, 2, 1)
  np.testing.assert_allclose(out[..., 0], (coords[..., 0] + 1) / 2 * (w - 1), atol=1e-6)


def test_bad_padding_mode():
  with pytest.raises(ValueError, match="padding_mode"):
    grid_sample(jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 1, 2)), "reflection")
