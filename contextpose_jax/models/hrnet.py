"""HRNet (W32 / W48), the frozen COCO pose backbone of CA-PF, in Flax (NHWC).

Behaviour of the official ``PoseHighResolutionNet`` (Sun et al., 2019) as the
CA-PF code uses it: a stem of two stride-2 3x3 convs and ``layer1``
(Bottlenecks), then stages of 2, 3 and 4 parallel branches of BasicBlocks with
all-to-all fusion. The COCO heatmap head (``final_layer``, a 1x1 conv with
bias from the final finest-branch output to 17 joint heatmaps) is built only
with ``heatmap_head=True``: CA-PF never uses it (its checkpoints lack it), a
converted COCO file keeps it for 2D detection. Submodules are named after the torch attributes with the digit
segments merged (``stage2.0.branches.1.3`` -> ``stage2_0/branches_1_3``), so
``load_torch_state_dict`` maps an official checkpoint key by key.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from contextpose_jax.models import materialize
from contextpose_jax.models import torch_import

# COCO checkpoints carry the heatmap head; a backbone built without it
# (``heatmap_head=False``, the CA-PF backbone) ignores those keys. With the
# head every key of a COCO file is loaded.
TORCH_IGNORED_KEYS = (r"^final_layer\.",)
TORCH_IGNORED_KEYS_WITH_HEAD = ()
NUM_COCO_JOINTS = 17

# Official init when trained from scratch: conv weights N(0, 0.001), BN 1 / 0.
_conv_init = nn.initializers.normal(stddev=0.001)


def _conv(features: int, kernel: int, stride: int, name: str, dtype) -> nn.Conv:
  # torch pads k//2 on both sides; Flax 'SAME' would pad stride 2 as (0, 1).
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), (stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=False,
                 kernel_init=_conv_init, dtype=dtype, name=name)


def _batch_norm(train: bool, name: str, dtype) -> nn.BatchNorm:
  # torch momentum 0.1 == Flax momentum 0.9; eps 1e-5 as in torch.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                      epsilon=1e-5, dtype=dtype, name=name)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> 1x1 (4x planes) residual block of ``layer1``."""
  planes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    out_channels = 4 * self.planes
    y = nn.relu(_batch_norm(train, "bn1", self.dtype)(
        _conv(self.planes, 1, 1, "conv1", self.dtype)(x)))
    y = nn.relu(_batch_norm(train, "bn2", self.dtype)(
        _conv(self.planes, 3, 1, "conv2", self.dtype)(y)))
    y = _batch_norm(train, "bn3", self.dtype)(
        _conv(out_channels, 1, 1, "conv3", self.dtype)(y))
    if x.shape[-1] != out_channels:
      x = _batch_norm(train, "downsample_1", self.dtype)(
          _conv(out_channels, 1, 1, "downsample_0", self.dtype)(x))
    return nn.relu(y + x)


class BasicBlock(nn.Module):
  """Two 3x3 convs with an identity shortcut (branch widths never change)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    channels = x.shape[-1]
    y = nn.relu(_batch_norm(train, "bn1", self.dtype)(
        _conv(channels, 3, 1, "conv1", self.dtype)(x)))
    y = _batch_norm(train, "bn2", self.dtype)(
        _conv(channels, 3, 1, "conv2", self.dtype)(y))
    return nn.relu(y + x)


def _upsample_nearest(x, factor: int):
  """torch ``nn.Upsample(scale_factor=factor, mode='nearest')`` on NHWC."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


class HighResolutionModule(nn.Module):
  """Parallel branches of BasicBlocks, then fusion of every branch pair by sum.

  Returns ``(branch_outputs, fused_outputs)``; the backbone taps the first.
  With ``multi_scale_output=False`` only the finest fused map is produced.
  """
  channels: Sequence[int]
  num_blocks: int
  multi_scale_output: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, xs, train: bool):
    n = len(self.channels)
    branches = []
    for b, x in enumerate(xs):
      for k in range(self.num_blocks):
        x = BasicBlock(dtype=self.dtype, name=f"branches_{b}_{k}")(x, train)
      branches.append(x)
    if n == 1:
      return branches, branches

    fused = []
    for i in range(n if self.multi_scale_output else 1):
      y = None
      for j in range(n):  # summed in branch order, as torch does
        z = branches[j]
        if j > i:  # coarser -> finer: 1x1 conv + BN, nearest upsampling
          z = _conv(self.channels[i], 1, 1, f"fuse_layers_{i}_{j}_0", self.dtype)(z)
          z = _batch_norm(train, f"fuse_layers_{i}_{j}_1", self.dtype)(z)
          z = _upsample_nearest(z, 2 ** (j - i))
        elif j < i:  # finer -> coarser: (i - j) stride-2 3x3 convs
          for k in range(i - j):
            last = k == i - j - 1
            features = self.channels[i] if last else self.channels[j]
            z = _conv(features, 3, 2, f"fuse_layers_{i}_{j}_{k}_0", self.dtype)(z)
            z = _batch_norm(train, f"fuse_layers_{i}_{j}_{k}_1", self.dtype)(z)
            if not last:
              z = nn.relu(z)
        y = z if y is None else y + z
      # Through an identity conv: XLA:CPU would otherwise fuse each block's
      # output into every later fusion and recompute branch 0's whole residual
      # stream there (materialize.py).
      fused.append(materialize.through_identity_conv(nn.relu(y)))
    return branches, fused


class HRNet(nn.Module):
  """HRNet backbone: ``images (B, H, W, 3) -> [y0, x1, x2, x3]`` (NHWC).

  With ``with_heatmaps=True`` (needs ``heatmap_head``) returns
  ``(maps, heatmaps)``, heatmaps (B, H/4, W/4, num_joints) from the same pass.

  H and W must be multiples of 32 (the official fusion needs it). At 256x192
  the W32 maps are 64x48x32, 32x24x64, 16x12x128 and 8x6x256.

  Attributes:
    width: channels of the finest branch; branch b has ``width * 2**b``.
    stage_modules: HighResolutionModules in stages 2, 3, 4.
    num_blocks: BasicBlocks per branch in every module.
    stem_channels: stem and layer1 planes (layer1 outputs 4x this).
    layer1_blocks: Bottlenecks in layer1.
    heatmap_head: build the COCO ``final_layer`` (its params exist only then).
    num_joints: heatmap channels of the head (17 COCO joints).
    dtype: compute dtype (params stay float32); the maps come out in it.
  """
  width: int = 32
  stage_modules: Sequence[int] = (1, 4, 3)
  num_blocks: int = 4
  stem_channels: int = 64
  layer1_blocks: int = 4
  heatmap_head: bool = False
  num_joints: int = NUM_COCO_JOINTS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False, with_heatmaps: bool = False):
    if len(self.stage_modules) != 3 or min(self.stage_modules) < 1:
      raise ValueError(f"HRNet: stage_modules must be 3 counts >= 1, got "
                       f"{self.stage_modules}")
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"HRNet: images must be (B, H, W, 3), got {images.shape}")
    if images.shape[1] % 32 or images.shape[2] % 32:
      raise ValueError(f"HRNet: image height and width must be multiples of 32 "
                       f"(the coarsest branch is 1/32), got {images.shape[1:3]}")
    dt = self.dtype
    x = nn.relu(_batch_norm(train, "bn1", dt)(
        _conv(self.stem_channels, 3, 2, "conv1", dt)(images)))
    x = nn.relu(_batch_norm(train, "bn2", dt)(
        _conv(self.stem_channels, 3, 2, "conv2", dt)(x)))
    for k in range(self.layer1_blocks):
      x = Bottleneck(self.stem_channels, dtype=dt, name=f"layer1_{k}")(x, train)

    ys = [x]
    num_stages = len(self.stage_modules)
    for s, modules in enumerate(self.stage_modules, start=2):
      channels = [self.width * 2 ** b for b in range(s)]
      xs = []
      for i, c in enumerate(channels):
        t = f"transition{s - 1}_{i}"
        if i < len(ys):  # adapt an existing branch's width (if it differs)
          z = ys[i]
          if z.shape[-1] != c:
            z = nn.relu(_batch_norm(train, f"{t}_1", dt)(
                _conv(c, 3, 1, f"{t}_0", dt)(z)))
        else:  # grow a new, coarser branch from the coarsest previous output
          z = ys[-1]
          for k in range(i + 1 - len(ys)):
            out = c if k == i - len(ys) else z.shape[-1]
            z = nn.relu(_batch_norm(train, f"{t}_{k}_1", dt)(
                _conv(out, 3, 2, f"{t}_{k}_0", dt)(z)))
        xs.append(z)

      ys = xs
      for m in range(modules):
        last = s == num_stages + 1 and m == modules - 1
        branches, ys = HighResolutionModule(
            channels, self.num_blocks, multi_scale_output=not last, dtype=dt,
            name=f"stage{s}_{m}")(ys, train)
        if m == 0:
          taps = branches
    # Official quirk: the lifter gets the list handed to the last stage, but
    # its first module overwrites that list in place with its branch outputs
    # (after the BasicBlocks, before fusion), so x1..x3 are those outputs.
    maps = [jnp.asarray(m, dt) for m in [ys[0], *taps[1:]]]
    if with_heatmaps and not self.heatmap_head:
      raise ValueError("HRNet: built without the heatmap head (heatmap_head=False)")
    if not self.heatmap_head:
      return maps
    # The official COCO head: final_layer(y_list[0]), FINAL_CONV_KERNEL 1,
    # init N(0, 0.001) / bias 0. Unused outputs are dropped under jit.
    heatmaps = nn.Conv(self.num_joints, (1, 1), use_bias=True, kernel_init=_conv_init,
                       dtype=dt, name="final_layer")(ys[0])
    return (maps, heatmaps) if with_heatmaps else maps


def load_torch_state_dict(state_dict: Mapping[str, Any], module: HRNet,
                          source: str = "FILE") -> dict[str, Any]:
  """Official HRNet state dict (numpy or torch values) -> Flax variables.

  Raises ``torch_import.ConversionError`` naming every missing, unexpected or
  mis-shaped key (e.g. a W48 file loaded into a W32 module). ``final_layer.*``
  is loaded when ``module.heatmap_head``, else ignored.
  """
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  target = jax.eval_shape(module.init, jax.random.PRNGKey(0), images)
  return torch_import.convert_state_dict(
      torch_import.to_numpy(state_dict), target,
      ignore=TORCH_IGNORED_KEYS_WITH_HEAD if module.heatmap_head else TORCH_IGNORED_KEYS,
      source=source)
