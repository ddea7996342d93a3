"""HRNet backbone: Flax vs. the PyTorch reference in the official key layout.

The reference (``torch_reference.hrnet``) was checked once
against the official ``pose_hrnet.py`` (identical state-dict keys and shapes,
identical outputs); here it gets random weights and random, non-trivial
BatchNorm statistics, its state dict goes through ``load_torch_state_dict``,
and the Flax maps are compared with the torch maps.

CPU cost: the reduced net is jitted at XLA optimization level 0 (compiles in
about a second); the full W32 runs op by op, which costs about half the CPU of
compiling its whole graph even at level 0.
"""
import copy
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from contextpose_jax.models import hrnet
from contextpose_jax.models import torch_import
from torch_reference import common
from torch_reference import hrnet as ref

# Reduced net that still has every structural feature: multi-module stages 3
# and 4 (so the stage-4 tap quirk matters), fusion chains of 1-3 stride-2
# convs, upsampling by 2/4/8, a transition that adapts widths (64 -> 8).
TINY = dict(width=8, stage_modules=(1, 2, 2), num_blocks=1, stem_channels=16,
            layer1_blocks=1)
TINY_INPUT = (2, 64, 96)  # (B, H, W); non-square catches H/W mix-ups


def _nchw_to_nhwc(a):
  return np.asarray(a).transpose(0, 2, 3, 1)


def _torch_maps(model, images_nhwc, dtype=torch.float32):
  model = copy.deepcopy(model).to(dtype).eval()
  with torch.no_grad():
    x = torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy()).to(dtype)
    return [_nchw_to_nhwc(m.numpy()) for m in model(x)]


def _random_images(seed, shape):
  return np.random.default_rng(seed).normal(size=(*shape, 3)).astype(np.float32)


def _randomized_reference(seed, calib_shape, **kwargs):
  """Random weights; BN statistics calibrated on a random (B, H, W) input."""
  model = ref.PoseHighResolutionNet(**kwargs)
  calib = _random_images(seed + 100, calib_shape).transpose(0, 3, 1, 2).copy()
  return common.randomize_(model, seed,
                           example_inputs=(torch.from_numpy(calib),)).eval()


def _as(variables, dtype):
  return jax.tree.map(lambda a: jnp.asarray(a, dtype), variables)


def _apply(module, variables, images, **kwargs):
  """``module.apply`` jitted at optimization level 0 (fast to compile)."""
  fn = jax.jit(lambda v, x: module.apply(v, x, **kwargs),
               compiler_options={"xla_backend_optimization_level": 0})
  return fn(variables, images)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
  # On a busy machine torch's spinning worker threads cost ~5x the CPU.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
  model = _randomized_reference(0, TINY_INPUT, **TINY)
  module = hrnet.HRNet(**TINY)
  variables = hrnet.load_torch_state_dict(common.state_dict_numpy(model), module,
                                          source="tiny")
  images = _random_images(1, TINY_INPUT)
  return model, module, variables, images


def test_tiny_parity_float32(tiny):
  model, module, variables, images = tiny
  want = _torch_maps(model, images)
  got = _apply(module, variables, jnp.asarray(images))
  assert [g.shape for g in got] == [(2, 16, 24, 8), (2, 8, 12, 16),
                                    (2, 4, 6, 32), (2, 2, 3, 64)]
  for level, (g, w) in enumerate(zip(got, want)):
    assert g.dtype == jnp.float32
    assert np.abs(w).max() > 1.0  # non-trivial activations
    np.testing.assert_allclose(np.asarray(g), w, atol=1e-4, rtol=1e-4,
                               err_msg=f"map {level}")


def test_tiny_identical_function_in_float64(tiny):
  # In float64 round-off vanishes, so any architectural difference (a wrong
  # tap, fusion order, padding, upsampling) shows up far above 1e-9.
  model, _, variables, images = tiny
  want = _torch_maps(model, images, torch.float64)
  with jax.enable_x64(True):
    module = hrnet.HRNet(**TINY, dtype=jnp.float64)
    got = _apply(module, _as(variables, jnp.float64),
                 jnp.asarray(images, jnp.float64))
    got = [np.asarray(g) for g in got]
  for level, (g, w) in enumerate(zip(got, want)):
    assert g.dtype == np.float64
    np.testing.assert_allclose(g, w, atol=1e-9, rtol=1e-9, err_msg=f"map {level}")


def test_stage4_taps_are_first_module_branch_outputs(tiny):
  """x1..x3 are stage4.0's branch outputs, far from the stage-4 inputs."""
  model, module, variables, images = tiny
  model = copy.deepcopy(model)
  seen = {}
  model.stage4[0].register_forward_pre_hook(
      lambda m, args: seen.__setitem__("inputs", [a.clone() for a in args[0]]))
  for b, branch in enumerate(model.stage4[0].branches):
    branch.register_forward_hook(
        lambda m, i, o, b=b: seen.__setitem__(b, o.detach().clone()))
  with torch.no_grad():
    maps = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
  for b in (1, 2, 3):
    np.testing.assert_array_equal(maps[b].numpy(), seen[b].numpy())
    # Taking the taps from the stage-4 inputs instead would be off by O(1),
    # so the parity tests above would catch it.
    assert np.abs(maps[b].numpy() - seen["inputs"][b].numpy()).max() > 0.5

  # The Flax module taps the same place (its own intermediates).
  got, state = _apply(module, variables, jnp.asarray(images),
                      capture_intermediates=True, mutable=["intermediates"])
  branches, _ = state["intermediates"]["stage4_0"]["__call__"][0]
  for b in (1, 2, 3):
    np.testing.assert_array_equal(np.asarray(got[b]), np.asarray(branches[b]))


def test_full_w32_parity():
  """Official W32 at 256x192, batch 1."""
  model = _randomized_reference(3, (1, 128, 96))
  module = hrnet.HRNet()  # defaults are the official W32
  variables = hrnet.load_torch_state_dict(common.state_dict_numpy(model), module)
  images = _random_images(4, (1, 256, 192))
  want = _torch_maps(model, images)
  got = module.apply(variables, jnp.asarray(images))
  assert [g.shape for g in got] == [(1, 64, 48, 32), (1, 32, 24, 64),
                                    (1, 16, 12, 128), (1, 8, 6, 256)]
  for level, (g, w) in enumerate(zip(got, want)):
    scale = np.abs(w).max()
    assert 1.0 < scale < 100.0  # O(1)-O(10) activations, as in a trained net
    # ~150 layers deep, float32 round-off alone is up to 5e-5 of a map's range
    # (torch float32 vs. torch float64 on this net: 1.6e-3 at a range of 62),
    # so a flat atol of 1e-4 cannot hold; the tolerance is 1e-4 of the range.
    # The float64 test on the reduced net is the tight check of the function.
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-4 * scale,
                               err_msg=f"map {level}")


def test_bfloat16_compute(tiny):
  model, _, variables, images = tiny
  want = _torch_maps(model, images)
  module = hrnet.HRNet(**TINY, dtype=jnp.bfloat16)
  got = _apply(module, variables, jnp.asarray(images))
  params = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.asarray(images))
  assert {l.dtype for l in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  for level, (g, w) in enumerate(zip(got, want)):
    assert g.dtype == jnp.bfloat16
    g = np.asarray(g, np.float32)
    # bf16 has an 8-bit mantissa: ~3% of the map's range here, not a bug's O(1).
    err = np.abs(g - w).max() / np.abs(w).max()
    assert err < 0.08, f"map {level}: relative error {err:.3f}"
    assert np.corrcoef(g.ravel(), w.ravel())[0, 1] > 0.995


def test_train_mode_uses_batch_statistics(tiny):
  model, module, variables, images = tiny
  model = copy.deepcopy(model).train()
  with torch.no_grad():
    want = [_nchw_to_nhwc(m.numpy()) for m in
            model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))]
  got, state = _apply(module, variables, jnp.asarray(images), train=True,
                      mutable=["batch_stats"])
  for level, (g, w) in enumerate(zip(got, want)):
    np.testing.assert_allclose(np.asarray(g), w, atol=1e-4, rtol=1e-4,
                               err_msg=f"map {level}")
  # Running means follow torch's momentum 0.1. (Running variances do not
  # match exactly: torch stores the unbiased batch variance, Flax the biased.)
  np.testing.assert_allclose(
      np.asarray(state["batch_stats"]["stage3_0"]["branches_2_0"]["bn1"]["mean"]),
      model.stage3[0].branches[2][0].bn1.running_mean.numpy(), atol=1e-5, rtol=1e-5)


def test_official_init():
  # Every HRNet conv/BN comes from the same two helpers, so a Bottleneck and
  # a 3-branch module (up- and down-sampling fusion) cover them; initializing
  # the whole net would cost ~10 s of XLA compilation.
  x = jnp.zeros((1, 16, 16, 8))
  O0 = {"xla_backend_optimization_level": 0}
  stem = hrnet.Bottleneck(planes=4)
  fuse = hrnet.HighResolutionModule(channels=(8, 16, 32), num_blocks=1)
  variables = [
      jax.jit(stem.init, static_argnums=2, compiler_options=O0)(
          jax.random.PRNGKey(0), x, False),
      jax.jit(fuse.init, static_argnums=2, compiler_options=O0)(
          jax.random.PRNGKey(1), [x, jnp.zeros((1, 8, 8, 16)),
                                  jnp.zeros((1, 4, 4, 32))], False)]
  def flat(collection):
    return {f"{i}/{k}": v for i, tree in enumerate(variables) for k, v in
            flax.traverse_util.flatten_dict(tree[collection], sep="/").items()}
  params, stats = flat("params"), flat("batch_stats")
  assert any("fuse_layers_2_0_1_0" in k for k in params)  # 2-step downsampling
  kernels = {k: v for k, v in params.items() if k.endswith("/kernel")}
  values = np.concatenate([np.ravel(v) for v in kernels.values()])
  assert abs(values.std() - 0.001) < 5e-5 and abs(values.mean()) < 5e-5
  for k in kernels:  # torch convs have bias=False
    assert k.replace("/kernel", "/bias") not in params, k
  for k, v in {**params, **stats}.items():
    if k.endswith(("/scale", "/var")):
      np.testing.assert_array_equal(v, 1.0, err_msg=k)
    elif k.endswith(("/bias", "/mean")):
      np.testing.assert_array_equal(v, 0.0, err_msg=k)


def test_state_dict_layout_matches_released_checkpoint():
  with torch.device("meta"):
    keys = ref.PoseHighResolutionNet().state_dict()
  # A few keys of pose_hrnet_w32_256x192.pth, with their shapes.
  expected = {
      "conv1.weight": (64, 3, 3, 3), "bn2.running_var": (64,),
      "layer1.0.downsample.0.weight": (256, 64, 1, 1),
      "layer1.3.conv3.weight": (256, 64, 1, 1),
      "transition1.0.0.weight": (32, 256, 3, 3),
      "transition1.1.0.0.weight": (64, 256, 3, 3),
      "transition2.2.0.0.weight": (128, 64, 3, 3),
      "transition3.3.0.1.running_mean": (256,),
      "stage2.0.branches.1.3.conv2.weight": (64, 64, 3, 3),
      "stage2.0.fuse_layers.1.0.0.0.weight": (64, 32, 3, 3),
      "stage3.3.fuse_layers.0.2.0.weight": (32, 128, 1, 1),
      "stage4.0.fuse_layers.3.0.2.0.weight": (256, 32, 3, 3),
      "stage4.0.fuse_layers.3.0.1.0.weight": (32, 32, 3, 3),
      "stage4.2.fuse_layers.0.3.1.running_var": (32,),
      "final_layer.weight": (17, 32, 1, 1), "final_layer.bias": (17,),
  }
  for key, shape in expected.items():
    assert tuple(keys[key].shape) == shape, key
  assert not any(k.startswith("stage4.2.fuse_layers.1") for k in keys)
  assert not any(k.startswith("stage4.3") or k.startswith("stage3.4") for k in keys)
  # BasicBlocks: 4 per branch; stages of 1 x 2, 4 x 3, 3 x 4 branches.
  blocks = [k for k in keys
            if re.fullmatch(r"stage\d\.\d+\.branches\.\d\.\d\.conv1\.weight", k)]
  assert len(blocks) == 4 * (1 * 2 + 4 * 3 + 3 * 4)


def _zeros_state_dict(**kwargs):
  with torch.device("meta"):
    model = ref.PoseHighResolutionNet(**kwargs)
  return {k: np.zeros(v.shape, np.float32) for k, v in model.state_dict().items()}


def test_w48_file_into_w32_module_names_misshaped_keys():
  w48, w32 = _zeros_state_dict(width=48), _zeros_state_dict(width=32)
  differing = [k for k in w48 if w48[k].shape != w32[k].shape
               and not k.startswith("final_layer") and "num_batches" not in k]
  with pytest.raises(torch_import.ConversionError) as e:
    hrnet.load_torch_state_dict(w48, hrnet.HRNet(), source="w48.pth")
  message = str(e.value)
  assert message.startswith("w48.pth")
  assert f"mis-shaped {len(differing)}" in message
  assert "transition1.0.0.weight (48, 256, 3, 3)" in message
  assert "missing" not in message and "unexpected" not in message


def test_missing_and_unexpected_keys_are_named():
  state = _zeros_state_dict(**TINY)
  module = hrnet.HRNet(**TINY)
  hrnet.load_torch_state_dict(state, module)  # final_layer.* is ignored

  del state["stage3.1.branches.2.0.bn1.running_var"]
  with pytest.raises(torch_import.ConversionError,
                     match=r"missing 1 .*batch_stats:stage3_1/branches_2_0/bn1/var"):
    hrnet.load_torch_state_dict(state, module)

  state = _zeros_state_dict(**TINY)
  state["stage2.0.branches.0.0.conv3.weight"] = np.zeros((8, 8, 3, 3), np.float32)
  with pytest.raises(
      torch_import.ConversionError,
      match=r"unexpected 1: stage2\.0\.branches\.0\.0\.conv3\.weight"):
    hrnet.load_torch_state_dict(state, module)


def test_bad_image_size_is_a_clear_error():
  module = hrnet.HRNet(**TINY)
  with pytest.raises(ValueError, match="multiples of 32"):
    jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 80, 64, 3)))


def test_heatmap_head_tiny_float64(tiny):
  """With ``heatmap_head`` the COCO final_layer is loaded and its heatmaps
  (from the last stage's finest fused output) equal torch's."""
  model, _, _, images = tiny
  state = common.state_dict_numpy(model)
  module = hrnet.HRNet(**TINY, heatmap_head=True)
  variables = hrnet.load_torch_state_dict(state, module, source="tiny")
  np.testing.assert_array_equal(variables["params"]["final_layer"]["bias"],
                                state["final_layer.bias"])
  with torch.no_grad():
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).double()
    want_maps, want = copy.deepcopy(model).double()(x, with_heatmaps=True)
  with jax.enable_x64(True):
    module64 = hrnet.HRNet(**TINY, heatmap_head=True, dtype=jnp.float64)
    maps, got = _apply(module64, _as(variables, jnp.float64),
                       jnp.asarray(images, jnp.float64), with_heatmaps=True)
    assert got.shape == (2, 16, 24, 17)
    np.testing.assert_allclose(np.asarray(got), _nchw_to_nhwc(want.numpy()),
                               atol=1e-9, rtol=1e-9)
    for g, w in zip(maps, want_maps):  # the maps are unchanged by the head
      np.testing.assert_allclose(np.asarray(g), _nchw_to_nhwc(w.numpy()), atol=1e-9, rtol=1e-9)

  # Strict with the head: a COCO file without final_layer is refused.
  del state["final_layer.weight"]
  with pytest.raises(torch_import.ConversionError,
                     match=r"missing 1 .*params:final_layer/kernel"):
    hrnet.load_torch_state_dict(state, module)
  with pytest.raises(ValueError, match="without the heatmap head"):
    _apply(hrnet.HRNet(**TINY), hrnet.load_torch_state_dict(state, hrnet.HRNet(**TINY)),
           jnp.asarray(images), with_heatmaps=True)
