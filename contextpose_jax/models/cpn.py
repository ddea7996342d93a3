"""CPN50 backbone (Cascaded Pyramid Network, Chen et al. 2018) in Flax.

ResNet-50 -> GlobalNet (top-down feature pyramid) -> RefineNet cascade. The
lifter reads the four cascade maps, all at `output_hw` (64x48 for a 256x192
crop) with `lateral_channels` (256) channels, coarsest ResNet stage first.

Submodule names follow the official torch attributes with the checkpoint-key
convention of `torch_import` (`resnet.layer1.0.downsample.0` ->
`resnet/layer1_0/downsample_0`), so COCO checkpoints convert without a key map.
"""

import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from contextpose_jax.models import torch_import
from contextpose_jax.models import matmul_precision
from contextpose_jax.models.resize import resize_bilinear_align_corners

# Heads that every official checkpoint holds. GlobalNet's per-level heatmap
# predictors are run, then discarded, by the official forward (its outputs are
# the intermediate supervision of CPN training; the CPN test code reads only
# the RefineNet output), so they are always ignored. RefineNet's
# `final_predict` is the COCO heatmap head: not run by CA-PF (ignored without
# `heatmap_head`), loaded with it.
TORCH_IGNORED_KEYS = (r'^global_net\.predict\.', r'^refine_net\.final_predict\.')
TORCH_IGNORED_KEYS_WITH_HEAD = (r'^global_net\.predict\.',)
NUM_COCO_JOINTS = 17


def _conv(features, kernel, strides=1, *, name, dtype):
  # Explicit symmetric padding like torch: 'SAME' pads (0, 1) at stride 2.
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                 padding=((pad, pad), (pad, pad)), use_bias=False,
                 dtype=dtype, name=name)


def _batch_norm(train, *, name, dtype):
  # torch momentum 0.1 == flax momentum 0.9; eps 1e-5 as in torch. In train
  # mode flax stores the biased batch variance where torch stores the
  # unbiased one; CA-PF freezes the backbone, so only fine-tuning sees it.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                      epsilon=1e-5, dtype=dtype, name=name)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 residual block.

  ResNet uses expansion 4 with a projection shortcut only where the shape
  changes; RefineNet uses expansion 2 and always projects.
  """
  planes: int
  expansion: int = 4
  strides: int = 1
  project: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(_conv, dtype=self.dtype)
    norm = functools.partial(_batch_norm, train, dtype=self.dtype)
    out_features = self.planes * self.expansion
    y = nn.relu(norm(name='bn1')(conv(self.planes, 1, name='conv1')(x)))
    y = conv(self.planes, 3, self.strides, name='conv2')(y)
    y = nn.relu(norm(name='bn2')(y))
    y = norm(name='bn3')(conv(out_features, 1, name='conv3')(y))
    shortcut = x
    if self.project:
      shortcut = conv(out_features, 1, self.strides, name='downsample_0')(x)
      shortcut = norm(name='downsample_1')(shortcut)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """ResNet trunk; returns the stage outputs coarsest first, [C5, C4, C3, C2]."""
  layers: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = _conv(self.width, 7, 2, name='conv1', dtype=self.dtype)(x)
    x = nn.relu(_batch_norm(train, name='bn1', dtype=self.dtype)(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    stages = []
    in_features = self.width
    for stage, num_blocks in enumerate(self.layers):
      planes = self.width * 2**stage
      for block in range(num_blocks):
        strides = 2 if (block == 0 and stage > 0) else 1
        project = block == 0 and (strides != 1 or in_features != planes * 4)
        x = Bottleneck(planes, 4, strides, project, dtype=self.dtype,
                       name=f'layer{stage + 1}_{block}')(x, train)
        in_features = planes * 4
      stages.append(x)
    return stages[::-1]


class GlobalNet(nn.Module):
  """Top-down pyramid: each level = lateral(C_k) + upsampled previous level."""
  lateral_channels: int = 256
  dtype: Any = jnp.float32
  matmul_precision: str = 'highest'  # of the resize (the model's precision policy)

  @nn.compact
  def __call__(self, features, train: bool = False):
    conv = functools.partial(_conv, dtype=self.dtype)
    norm = functools.partial(_batch_norm, train, dtype=self.dtype)
    pyramid = []
    up = None
    for i, feature in enumerate(features):
      level = conv(self.lateral_channels, 1, name=f'laterals_{i}_0')(feature)
      level = nn.relu(norm(name=f'laterals_{i}_1')(level))
      if up is not None:
        if up.shape != level.shape:
          raise ValueError(
              f'CPN: upsampled level {i - 1} has shape {up.shape[1:3]} but '
              f'ResNet stage has {level.shape[1:3]}; the image height and '
              'width must be multiples of 32')
        level = level + up  # the sum itself gets no ReLU
      pyramid.append(level)
      if i != len(features) - 1:
        # nn.Upsample(scale_factor=2, align_corners=True) -> 1x1 conv -> BN.
        _, h, w, _ = level.shape
        up = resize_bilinear_align_corners(level, (2 * h, 2 * w),
                                           matmul_precision(self.matmul_precision))
        up = conv(self.lateral_channels, 1, name=f'upsamples_{i}_1')(up)
        up = norm(name=f'upsamples_{i}_2')(up)
    return pyramid


class RefineNet(nn.Module):
  """Cascade i refines pyramid level i with (levels - 1 - i) bottlenecks and
  resizes it to the output resolution.

  Returns ``(outputs, heatmaps)``; heatmaps is None without ``heatmap_head``.
  """
  lateral_channels: int = 256
  output_hw: Sequence[int] = (64, 48)
  heatmap_head: bool = False
  num_joints: int = NUM_COCO_JOINTS
  dtype: Any = jnp.float32
  matmul_precision: str = 'highest'  # of the resize (the model's precision policy)

  @nn.compact
  def __call__(self, pyramid, train: bool = False):
    outputs = []
    for i, x in enumerate(pyramid):
      for k in range(len(pyramid) - 1 - i):
        # Official: Bottleneck(256, 128) with expansion 2 keeps 256 channels.
        x = Bottleneck(self.lateral_channels // 2, 2, 1, True,
                       dtype=self.dtype, name=f'cascade_{i}_{k}')(x, train)
      outputs.append(resize_bilinear_align_corners(
          x, self.output_hw, matmul_precision(self.matmul_precision)))
    if not self.heatmap_head:
      return outputs, None
    # Official `final_predict` on the channel-concatenated cascade (cascade
    # order): Bottleneck(4 * 256 -> 128 planes, expansion 2, projected) ->
    # 3x3 conv (no bias) -> BN. The official forward has it commented out.
    x = jnp.concatenate(outputs, axis=-1)
    x = Bottleneck(self.lateral_channels // 2, 2, 1, True, dtype=self.dtype,
                   name='final_predict_0')(x, train)
    x = _conv(self.num_joints, 3, name='final_predict_1', dtype=self.dtype)(x)
    heatmaps = _batch_norm(train, name='final_predict_2', dtype=self.dtype)(x)
    return outputs, heatmaps


class CPN(nn.Module):
  """CPN backbone: NHWC images -> 4 cascade maps (B, *output_hw, lateral).

  `width` is the ResNet base width (64 for ResNet-50; stage outputs are
  4, 8, 16, 32 times it); RefineNet bottlenecks use lateral_channels // 2
  planes. `dtype` is the compute dtype; parameters stay float32.
  With `heatmap_head` the RefineNet's `final_predict` is built and
  `with_heatmaps=True` returns `(maps, heatmaps)`, heatmaps
  (B, *output_hw, num_joints) from the same pass.
  """
  resnet_layers: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  lateral_channels: int = 256
  output_hw: Sequence[int] = (64, 48)
  heatmap_head: bool = False
  num_joints: int = NUM_COCO_JOINTS
  dtype: Any = jnp.float32
  # 'highest' | 'high' | 'default': the precision of the align-corners
  # resizes (two small matmuls each), from the model config.
  matmul_precision: str = 'highest'

  @nn.compact
  def __call__(self, images, train: bool = False, with_heatmaps: bool = False):
    if len(self.resnet_layers) != 4:
      raise ValueError(f'CPN: resnet_layers needs 4 stages, got {self.resnet_layers}')
    stages = ResNet(tuple(self.resnet_layers), self.width, self.dtype,
                    name='resnet')(images, train)
    pyramid = GlobalNet(self.lateral_channels, self.dtype, self.matmul_precision,
                        name='global_net')(stages, train)
    if with_heatmaps and not self.heatmap_head:
      raise ValueError('CPN: built without the heatmap head (heatmap_head=False)')
    maps, heatmaps = RefineNet(self.lateral_channels, tuple(self.output_hw),
                               self.heatmap_head, self.num_joints, self.dtype,
                               self.matmul_precision, name='refine_net')(pyramid, train)
    return (maps, heatmaps) if with_heatmaps else maps


def load_torch_state_dict(state_dict: Mapping[str, Any], module: CPN,
                          source: str = 'FILE') -> dict:
  """Official CPN state dict (numpy, `module.` prefix already stripped) ->
  Flax variables {'params', 'batch_stats'} for `module`.

  Raises torch_import.ConversionError naming every missing, unexpected or
  mis-shaped key. `refine_net.final_predict.*` is loaded when
  `module.heatmap_head`, else ignored.
  """
  # Parameter shapes do not depend on the image size; use the native crop.
  h, w = (4 * s for s in module.output_hw)
  images = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
  target = jax.eval_shape(module.init, jax.random.PRNGKey(0), images)
  state_dict = torch_import.to_numpy(state_dict)
  return torch_import.convert_state_dict(
      state_dict, target, source=source,
      ignore=TORCH_IGNORED_KEYS_WITH_HEAD if module.heatmap_head else TORCH_IGNORED_KEYS)
