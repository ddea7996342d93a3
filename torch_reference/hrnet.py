"""PyTorch HRNet (W32 / W48) as the CA-PF backbone, in the official key layout.

Behaviour of the official ``ContextPose/mvn/models/pose_hrnet.py``
(``PoseHighResolutionNet``), restructured: a saved state dict has exactly the
keys of the released COCO ``pose_hrnet_w32_256x192.pth`` (``conv1``, ``bn1``,
``layer1.N.*``, ``transitionK.*``, ``stageK.M.branches.*``,
``stageK.M.fuse_layers.*`` and the COCO head ``final_layer``), and ``forward``
returns the four maps the official backbone hands to the lifter (NCHW);
``forward(x, with_heatmaps=True)`` also returns the COCO heatmaps, computed as
the official COCO HRNet does (``final_layer(y_list[0])``, the last stage's
fused finest output; the CA-PF code has that line commented out).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

NUM_COCO_JOINTS = 17


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, relu: bool):
  """Conv (no bias) + BatchNorm [+ ReLU] as one Sequential (keys .0 / .1)."""
  layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
            nn.BatchNorm2d(cout)]
  if relu:
    layers.append(nn.ReLU())
  return nn.Sequential(*layers)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> 1x1 (x4 channels) residual block of layer1."""
  expansion = 4

  def __init__(self, cin: int, planes: int):
    super().__init__()
    cout = planes * self.expansion
    self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(cout)
    self.downsample = (_conv_bn(cin, cout, 1, 1, relu=False)
                       if cin != cout else None)

  def forward(self, x):
    out = torch.relu(self.bn1(self.conv1(x)))
    out = torch.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    shortcut = x if self.downsample is None else self.downsample(x)
    return torch.relu(out + shortcut)


class BasicBlock(nn.Module):
  """Two 3x3 convs with an identity shortcut (branch widths never change)."""

  def __init__(self, channels: int):
    super().__init__()
    self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(channels)
    self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(channels)

  def forward(self, x):
    out = torch.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return torch.relu(out + x)


class HighResolutionModule(nn.Module):
  """Parallel branches of BasicBlocks, then an all-to-all fusion by summation."""

  def __init__(self, channels: Sequence[int], num_blocks: int,
               multi_scale_output: bool = True):
    super().__init__()
    n = len(channels)
    self.branches = nn.ModuleList(
        nn.Sequential(*[BasicBlock(c) for _ in range(num_blocks)])
        for c in channels)
    fuse_layers = []
    for i in range(n if multi_scale_output else 1):
      row = []
      for j in range(n):
        if j > i:  # coarser -> finer: 1x1 conv, BN, nearest upsampling
          row.append(nn.Sequential(
              nn.Conv2d(channels[j], channels[i], 1, bias=False),
              nn.BatchNorm2d(channels[i]),
              nn.Upsample(scale_factor=2 ** (j - i), mode="nearest")))
        elif j == i:
          row.append(None)
        else:  # finer -> coarser: (i - j) stride-2 3x3 convs
          steps = [_conv_bn(channels[j], channels[j], 3, 2, relu=True)
                   for _ in range(i - j - 1)]
          steps.append(_conv_bn(channels[j], channels[i], 3, 2, relu=False))
          row.append(nn.Sequential(*steps))
      fuse_layers.append(nn.ModuleList(row))
    self.fuse_layers = nn.ModuleList(fuse_layers) if n > 1 else None

  def forward(self, xs: list):
    # Writes the branch outputs back into the caller's list, as the official
    # module does; PoseHighResolutionNet.forward depends on that (see below).
    for i, branch in enumerate(self.branches):
      xs[i] = branch(xs[i])
    if self.fuse_layers is None:
      return [xs[0]]
    fused = []
    for i, row in enumerate(self.fuse_layers):
      y = xs[0] if row[0] is None else row[0](xs[0])
      for j in range(1, len(xs)):
        y = y + (xs[j] if row[j] is None else row[j](xs[j]))
      fused.append(torch.relu(y))
    return fused


class _Stage(nn.Sequential):
  """Sequential of HighResolutionModules that passes a list through."""


def _transition(cin: Sequence[int], cout: Sequence[int]) -> nn.ModuleList:
  """Adapts the previous stage's branches and grows one new, coarser branch."""
  layers = []
  for i, c in enumerate(cout):
    if i < len(cin):
      layers.append(_conv_bn(cin[i], c, 3, 1, relu=True) if cin[i] != c else None)
    else:
      steps = [_conv_bn(cin[-1], c if k == i - len(cin) else cin[-1], 3, 2,
                        relu=True) for k in range(i + 1 - len(cin))]
      layers.append(nn.Sequential(*steps))
  return nn.ModuleList(layers)


class PoseHighResolutionNet(nn.Module):
  """HRNet backbone; ``forward(images NCHW) -> [y0, x1, x2, x3]`` (NCHW)."""

  def __init__(self, width: int = 32, stage_modules: Sequence[int] = (1, 4, 3),
               num_blocks: int = 4, stem_channels: int = 64,
               layer1_blocks: int = 4, num_joints: int = NUM_COCO_JOINTS):
    super().__init__()
    self.conv1 = nn.Conv2d(3, stem_channels, 3, 2, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(stem_channels)
    self.conv2 = nn.Conv2d(stem_channels, stem_channels, 3, 2, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(stem_channels)
    layer1_out = stem_channels * Bottleneck.expansion
    self.layer1 = nn.Sequential(*[
        Bottleneck(stem_channels if k == 0 else layer1_out, stem_channels)
        for k in range(layer1_blocks)])

    previous = [layer1_out]
    for s, modules in enumerate(stage_modules, start=2):
      channels = [width * 2 ** b for b in range(s)]
      setattr(self, f"transition{s - 1}", _transition(previous, channels))
      last = s == 1 + len(stage_modules)
      setattr(self, f"stage{s}", _Stage(*[
          HighResolutionModule(channels, num_blocks,
                               multi_scale_output=not (last and m == modules - 1))
          for m in range(modules)]))
      previous = channels
    self.num_stages = len(stage_modules)
    # The COCO heatmap head (FINAL_CONV_KERNEL 1, padding 0, with bias): in
    # released COCO checkpoints, never used by CA-PF.
    self.final_layer = nn.Conv2d(width, num_joints, 1)

  def forward(self, x, with_heatmaps: bool = False):
    x = torch.relu(self.bn1(self.conv1(x)))
    x = torch.relu(self.bn2(self.conv2(x)))
    ys = [self.layer1(x)]
    for s in range(2, self.num_stages + 2):
      transition = getattr(self, f"transition{s - 1}")
      xs = []
      for i, t in enumerate(transition):
        # The new, coarser branch grows from the coarsest previous output.
        inp = ys[i] if i < len(ys) else ys[-1]
        xs.append(inp if t is None else t(inp))
      ys = xs
      for module in getattr(self, f"stage{s}"):
        ys = module(ys)
    # ``xs`` is the list handed to the last stage; its first module has
    # overwritten the entries in place with its branch outputs.
    maps = [ys[0], *xs[1:]]
    if with_heatmaps:
      return maps, self.final_layer(ys[0])
    return maps
