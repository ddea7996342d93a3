"""Parity of the Flax CPN backbone and the align_corners resize with PyTorch.

The torch side is `torch_reference.cpn` (official key layout)
with random weights; the Flax side gets them only through
`cpn.load_torch_state_dict`, so these tests cover the converter as well.

The reference answer is the torch model evaluated in float64. Full-size CPN50
is compared in float64 (diffs ~1e-12: every op, padding and ordering is the
same). Float32 is compared on the reduced CPN: through the stacked
convolutions float32 drifts by ~1e-5 relative (torch float32 itself is ~7e-5
off on maps of size ~10), so full-size float32 maps differ by ~1e-3 in torch
and Flax alike and could not prove anything at 1e-4.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from contextpose_jax.models import cpn
from contextpose_jax.models import torch_import
from contextpose_jax.models.resize import resize_bilinear_align_corners
from torch_reference import cpn as torch_cpn
from torch_reference.common import randomize_, state_dict_numpy

SMALL = dict(resnet_layers=(1, 1, 1, 1), width=8, lateral_channels=32)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().permute(0, 2, 3, 1).numpy()


def _images(seed, batch):
  # CPN inputs are x/255 - mean/255: roughly uniform in [-0.5, 0.5].
  rng = np.random.default_rng(seed)
  return rng.uniform(-0.5, 0.5, (batch, 256, 192, 3)).astype(np.float32)


# ----------------------------------------------------------------- resize

RESIZE_CASES = [
    ((8, 6), (16, 12)),   # the GlobalNet x2 upsampling
    ((8, 6), (64, 48)),   # a RefineNet cascade resize
    ((13, 11), (5, 17)),  # down along H, up along W
    ((1, 5), (3, 1)),     # size-1 input and output dims
    ((5, 5), (1, 1)),
    ((1, 1), (4, 4)),
    ((7, 3), (7, 3)),     # identity
]


@pytest.mark.parametrize('in_hw,out_hw', RESIZE_CASES)
def test_resize_matches_torch_values_and_gradient(in_hw, out_hw):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, *in_hw, 3)).astype(np.float32)
  cotangent = rng.normal(size=(2, *out_hw, 3)).astype(np.float32)

  x_torch = _nchw(x).requires_grad_(True)
  y_torch = F.interpolate(x_torch, size=out_hw, mode='bilinear',
                          align_corners=True)
  (y_torch * _nchw(cotangent)).sum().backward()

  @jax.jit
  def value_and_grad(v, ct):
    y, vjp = jax.vjp(lambda u: resize_bilinear_align_corners(u, out_hw), v)
    return y, vjp(ct)[0]

  y, grad = value_and_grad(x, cotangent)
  np.testing.assert_allclose(y, _nhwc(y_torch), atol=1e-6, rtol=0)
  np.testing.assert_allclose(grad, _nhwc(x_torch.grad), atol=1e-5, rtol=1e-5)


def test_resize_matches_upsample_module_and_keeps_identity():
  x = np.random.default_rng(1).normal(size=(1, 16, 12, 4)).astype(np.float32)
  upsample = torch.nn.Upsample(scale_factor=2, mode='bilinear',
                               align_corners=True)
  np.testing.assert_allclose(resize_bilinear_align_corners(x, (32, 24)),
                             _nhwc(upsample(_nchw(x))), atol=1e-6, rtol=0)
  np.testing.assert_array_equal(resize_bilinear_align_corners(x, (16, 12)), x)


# -------------------------------------------------------------------- CPN


def _calibrate_batch_stats_(model, images):
  """Sets every BatchNorm's running stats to the statistics of `images`.

  randomize_ draws running stats independently of the activations, so through
  ResNet-50 the maps grow to ~1e4; one train-mode pass with momentum 1 makes
  the net normalise like a trained one (maps of order 10).
  """
  norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  for m in norms:
    m.momentum = 1.0
  model.train()
  with torch.no_grad():
    model(_nchw(images))
  for m in norms:
    m.momentum = 0.1
  return model.eval()


def _torch_model(seed, **kwargs):
  model = randomize_(torch_cpn.CPN(**kwargs), seed=seed)
  return _calibrate_batch_stats_(model, _images(seed + 100, 1))


def _torch_maps_float64(model, images):
  """Exact reference: the float32 weights evaluated in float64."""
  model64 = copy.deepcopy(model).double().eval()
  with torch.no_grad():
    return [_nhwc(m) for m in model64(_nchw(images).double())]


def _flax_maps_float64(module_kwargs, state_dict, images):
  with jax.enable_x64(True):
    module = cpn.CPN(**module_kwargs, dtype=jnp.float64)
    variables = cpn.load_torch_state_dict(state_dict, module, source='test')
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    maps = jax.jit(module.apply)(variables, jnp.asarray(images, jnp.float64))
    return [np.asarray(m) for m in maps]


@pytest.fixture(scope='module')
def small_model():
  model = _torch_model(0, **SMALL)
  return model, state_dict_numpy(model)


def test_small_cpn_matches_torch(small_model):
  model, state_dict = small_model
  images = _images(1, 2)
  expected = _torch_maps_float64(model, images)
  assert [m.shape for m in expected] == [(2, 64, 48, 32)] * 4

  module = cpn.CPN(**SMALL)
  variables = cpn.load_torch_state_dict(state_dict, module)
  maps32 = jax.jit(module.apply)(variables, images)
  for got, want in zip(maps32, expected):
    assert got.dtype == jnp.float32
    # Measured 5e-5 (torch float32: 7e-5).
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

  # bf16 compute: its rounding (~0.4%) grows by ~1-3% per bottleneck on this
  # random net; the deepest cascade measures ~12% relative L2 error.
  maps16 = jax.jit(cpn.CPN(**SMALL, dtype=jnp.bfloat16).apply)(variables, images)
  for got, want in zip(maps16, expected):
    assert got.dtype == jnp.bfloat16
    got = np.asarray(got, np.float64)
    assert np.linalg.norm(got - want) <= 0.25 * np.linalg.norm(want)


def test_cpn50_matches_torch():
  model = _torch_model(3)
  images = _images(4, 1)
  expected = _torch_maps_float64(model, images)
  got = _flax_maps_float64({}, state_dict_numpy(model), images)
  for g, want in zip(got, expected):
    assert g.shape == (1, 64, 48, 256)
    np.testing.assert_allclose(g, want, atol=1e-9, rtol=0)


def test_state_dict_mismatches_are_named(small_model):
  _, state_dict = small_model
  module = cpn.CPN(**SMALL)
  # The unused heads are in every checkpoint and are dropped, not required.
  assert any(k.startswith('global_net.predict.') for k in state_dict)
  assert any(k.startswith('refine_net.final_predict.') for k in state_dict)
  variables = cpn.load_torch_state_dict(state_dict, module)
  assert 'predict' not in str(jax.tree_util.tree_structure(variables))

  missing = dict(state_dict)
  del missing['refine_net.cascade.0.2.downsample.1.running_var']
  with pytest.raises(torch_import.ConversionError,
                     match='refine_net/cascade_0_2/downsample_1/var'):
    cpn.load_torch_state_dict(missing, module, source='ckpt.pth')

  unexpected = dict(state_dict, **{'global_net.laterals.4.0.weight':
                                   np.zeros((32, 8, 1, 1), np.float32)})
  with pytest.raises(torch_import.ConversionError,
                     match=r'global_net\.laterals\.4\.0\.weight'):
    cpn.load_torch_state_dict(unexpected, module)

  misshaped = dict(state_dict)
  misshaped['resnet.layer2.0.conv2.weight'] = np.zeros((16, 16, 1, 1),
                                                       np.float32)
  with pytest.raises(torch_import.ConversionError,
                     match=r'mis-shaped.*resnet\.layer2\.0\.conv2\.weight'):
    cpn.load_torch_state_dict(misshaped, module)


def test_heatmap_head_loads_final_predict_strictly(small_model):
  """With `heatmap_head` RefineNet's final_predict is loaded (heatmap parity:
  tests/test_detect.py); GlobalNet's predict heads stay ignored."""
  _, state_dict = small_model
  module = cpn.CPN(**SMALL, heatmap_head=True)
  variables = cpn.load_torch_state_dict(state_dict, module)
  refine = variables['params']['refine_net']
  assert {'final_predict_0', 'final_predict_1', 'final_predict_2'} <= set(refine)
  np.testing.assert_array_equal(
      refine['final_predict_1']['kernel'],
      state_dict['refine_net.final_predict.1.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      variables['batch_stats']['refine_net']['final_predict_2']['var'],
      state_dict['refine_net.final_predict.2.running_var'])
  assert 'predict' not in str(jax.tree_util.tree_structure(variables['params']['global_net']))

  missing = dict(state_dict)
  del missing['refine_net.final_predict.2.running_mean']
  with pytest.raises(torch_import.ConversionError,
                     match='missing 1 .*refine_net/final_predict_2/mean'):
    cpn.load_torch_state_dict(missing, module, source='ckpt.pth')
