"""The Flax lifter against the PyTorch reference (official key layout)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from contextpose_jax.models import torch_import
from contextpose_jax.models.lifter import Lifter
from torch_reference.lifter import PoseTransformer

HRNET32_DIMS = (32, 64, 128, 256)
MAP_HW = ((64, 48), (32, 24), (16, 12), (8, 6))


def _smooth(x, width=3):
  # Backbone features are spatially smooth; white noise would make the
  # deformable stack chaotic (float32 rounding amplified block after block).
  kernel = np.ones(width) / width
  for axis in (1, 2):
    x = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="same"), axis, x)
  return x / x.std()


def _inputs(rng, b, dims):
  kp2d = rng.uniform(-1, 1, (b, 17, 2)).astype(np.float32)
  # Reference points inside and a few outside the crop (zeros/border padding).
  ref = rng.uniform(-1.2, 1.2, (b, 17, 2)).astype(np.float32)
  maps = [_smooth(rng.normal(size=(b, h, w, d))).astype(np.float32)
          for (h, w), d in zip(MAP_HW, dims)]
  return kp2d, ref, maps


def _randomize(module, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.ndim == 1 else p.shape[-1] ** -0.5))
      if "sampling_offsets" in name:
        p.mul_(2.0)  # offsets that move samples by pixels, some off the map


def _flax_variables(torch_module, flax_module, inputs):
  target = jax.eval_shape(lambda: flax_module.init(jax.random.PRNGKey(0), *inputs))
  return torch_import.convert_state_dict(
      torch_import.to_numpy(torch_module.state_dict()), target, source="test")


def _torch_forward(module, kp2d, ref, maps):
  with torch.no_grad():
    return module(torch.tensor(kp2d), torch.tensor(ref),
                  [torch.tensor(m).permute(0, 3, 1, 2) for m in maps]).numpy()


@pytest.mark.parametrize("deformable,embed_dim,dims", [
    (True, 32, (8, 16, 32, 64)),      # H36M model, reduced width
    (False, 64, HRNET32_DIMS),        # MPI-INF-3DHP model (HRNet-W32, C = 64)
])
def test_lifter_matches_torch(deformable, embed_dim, dims):
  rng = np.random.default_rng(1)
  kp2d, ref, maps = _inputs(rng, 3, dims)
  torch_lifter = PoseTransformer(dims, embed_dim=embed_dim, deformable=deformable).eval()
  _randomize(torch_lifter, seed=2)
  lifter = Lifter(embed_dim=embed_dim, deformable=deformable)
  variables = _flax_variables(torch_lifter, lifter, (kp2d, ref, maps))
  got = jax.jit(lifter.apply)(variables, kp2d, ref, maps)
  want = _torch_forward(torch_lifter, kp2d, ref, maps)
  assert got.shape == (3, 1, 17, 3)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_official_parameter_count_and_init():
  # The official HRNet-W32 H36M lifter has 14,094,147 parameters.
  rng = np.random.default_rng(0)
  kp2d, ref, maps = _inputs(rng, 1, HRNET32_DIMS)
  lifter = Lifter()
  variables = lifter.init(jax.random.PRNGKey(0), kp2d, ref, maps)
  count = sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]))
  torch_count = sum(p.numel() for p in PoseTransformer(HRNET32_DIMS).parameters())
  assert count == torch_count == 14_094_147

  # Official deformable init: zero offset/attention-weight kernels; offsets bias
  # equal to the torch construction.
  torch_block = PoseTransformer(HRNET32_DIMS).context_blocks[2]
  block = variables["params"]["context_blocks_2"]
  np.testing.assert_array_equal(block["sampling_offsets"]["kernel"], 0.0)
  np.testing.assert_array_equal(block["attention_weights"]["kernel"], 0.0)
  np.testing.assert_array_equal(block["attention_weights"]["bias"], 0.0)
  np.testing.assert_allclose(block["sampling_offsets"]["bias"],
                             torch_block.sampling_offsets.bias.detach().numpy(), atol=1e-7)
  np.testing.assert_array_equal(variables["params"]["Spatial_pos_embed"], 0.0)
  # torch's nn.Linear default init range U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  fc1 = variables["params"]["joint_blocks_0"]["mlp"]["fc1"]
  bound = 1 / np.sqrt(640)
  assert np.abs(fc1["kernel"]).max() <= bound and np.abs(fc1["kernel"]).max() > 0.9 * bound
  assert np.abs(fc1["bias"]).max() <= bound


def test_gradients_reach_offsets_and_match_torch():
  # The offsets are learned through the sampler: their gradients must equal torch's.
  rng = np.random.default_rng(3)
  dims = (4, 8, 8, 16)
  kp2d, ref, maps = _inputs(rng, 2, dims)
  torch_lifter = PoseTransformer(dims, embed_dim=16, depth=2).eval()
  _randomize(torch_lifter, seed=4)
  lifter = Lifter(embed_dim=16, depth=2)
  variables = _flax_variables(torch_lifter, lifter, (kp2d, ref, maps))
  target = rng.normal(size=(2, 1, 17, 3)).astype(np.float32)

  out = torch_lifter(torch.tensor(kp2d), torch.tensor(ref),
                     [torch.tensor(m).permute(0, 3, 1, 2) for m in maps])
  ((out - torch.tensor(target)) ** 2).sum().backward()

  def loss(params):
    pred = lifter.apply({"params": params}, kp2d, ref, maps)
    return jnp.sum((pred - target) ** 2)
  grads = jax.jit(jax.grad(loss))(variables["params"])
  for i in range(2):
    want = torch_lifter.context_blocks[i].sampling_offsets.weight.grad.numpy().T
    got = grads[f"context_blocks_{i}"]["sampling_offsets"]["kernel"]
    assert np.abs(want).max() > 1e-3  # the test would be vacuous otherwise
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(grads["coord_embed"]["kernel"],
                             torch_lifter.coord_embed.weight.grad.numpy().T, rtol=1e-3, atol=1e-4)


def test_drop_path_and_dropout_are_active_only_in_training():
  rng = np.random.default_rng(5)
  kp2d, ref, maps = _inputs(rng, 4, (4, 4, 4, 4))
  # No deformable blocks: the same DropPath / Dropout modules, a quarter of the
  # XLA compile time (random-bit generation compiles slowly on CPU).
  lifter = Lifter(embed_dim=16, depth=2, drop_path_rate=0.5, drop_rate=0.1, deformable=False)
  variables = lifter.init(jax.random.PRNGKey(0), kp2d, ref, maps)  # op by op: cheaper than jit once

  @jax.jit  # one compilation for all four calls
  def run(variables):
    key_1, key_2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    return (lifter.apply(variables, kp2d, ref, maps),
            lifter.apply(variables, kp2d, ref, maps, train=False, rngs={"dropout": key_1}),
            lifter.apply(variables, kp2d, ref, maps, train=True, rngs={"dropout": key_1}),
            lifter.apply(variables, kp2d, ref, maps, train=True, rngs={"dropout": key_2}))
  eval_a, eval_b, train_a, train_b = (np.asarray(x) for x in run(variables))
  np.testing.assert_array_equal(eval_a, eval_b)
  assert np.abs(train_a - train_b).max() > 1e-4
  assert np.abs(train_a - eval_a).max() > 1e-4


def test_context_free_baseline_ignores_images():
  rng = np.random.default_rng(6)
  kp2d, ref, maps = _inputs(rng, 2, (4, 4, 4, 4))
  lifter = Lifter(embed_dim=16, depth=2, use_context=False)
  variables = lifter.init(jax.random.PRNGKey(0), kp2d, ref, maps)
  assert "feat_embed_0" not in variables["params"]
  assert variables["params"]["Spatial_pos_embed"].shape == (1, 1, 17, 16)
  a = lifter.apply(variables, kp2d, ref, maps)
  b = lifter.apply(variables, kp2d, ref, [m * 0 + 7 for m in maps])
  np.testing.assert_array_equal(a, b)
