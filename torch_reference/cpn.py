"""PyTorch CPN backbone in the official state-dict key layout.

A re-implementation of ContextPose/mvn/models/networks/{network,resnet,
globalNet,refineNet}.py used as the numerical reference for the Flax port:
`CPN().state_dict()` has exactly the keys of the official CPN50 checkpoints
(`resnet.*`, `global_net.{laterals,upsamples,predict}.*`,
`refine_net.{cascade,final_predict}.*`). The defaults are CPN50; `width`,
`lateral_channels` and `resnet_layers` shrink it for fast tests.
"""

from typing import List, Sequence

import torch
from torch import nn


def _conv(in_channels, out_channels, kernel, stride=1):
  return nn.Conv2d(in_channels, out_channels, kernel, stride=stride,
                   padding=kernel // 2, bias=False)


class Bottleneck(nn.Module):
  """conv1/bn1 (1x1) -> conv2/bn2 (3x3, strided) -> conv3/bn3 (1x1), with an
  optional `downsample` = Sequential(1x1 conv, BN) shortcut."""

  def __init__(self, in_channels, planes, expansion=4, stride=1,
               project=False):
    super().__init__()
    out_channels = planes * expansion
    self.conv1 = _conv(in_channels, planes, 1)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = _conv(planes, planes, 3, stride)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = _conv(planes, out_channels, 1)
    self.bn3 = nn.BatchNorm2d(out_channels)
    self.downsample = None
    if project:
      self.downsample = nn.Sequential(
          _conv(in_channels, out_channels, 1, stride),
          nn.BatchNorm2d(out_channels))

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = torch.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    shortcut = x if self.downsample is None else self.downsample(x)
    return torch.relu(y + shortcut)


class ResNet(nn.Module):
  """Stem + 4 bottleneck stages; forward gives [C5, C4, C3, C2]."""

  def __init__(self, layers=(3, 4, 6, 3), width=64):
    super().__init__()
    self.conv1 = _conv(3, width, 7, 2)
    self.bn1 = nn.BatchNorm2d(width)
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    in_channels = width
    for stage, num_blocks in enumerate(layers):
      planes = width * 2**stage
      blocks = []
      for block in range(num_blocks):
        stride = 2 if (block == 0 and stage > 0) else 1
        project = block == 0 and (stride != 1 or in_channels != planes * 4)
        blocks.append(Bottleneck(in_channels, planes, 4, stride, project))
        in_channels = planes * 4
      setattr(self, f'layer{stage + 1}', nn.Sequential(*blocks))
    self.out_channels = [width * 4 * 2**s for s in range(4)][::-1]

  def forward(self, x) -> List[torch.Tensor]:
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    stages = []
    for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
      x = layer(x)
      stages.append(x)
    return stages[::-1]


class GlobalNet(nn.Module):
  """Laterals (conv, BN, ReLU), x2 upsamplers (Upsample, conv, BN) and the
  per-level heatmap heads `predict` (in the checkpoints; unused by CA-PF)."""

  def __init__(self, in_channels: Sequence[int], lateral_channels=256,
               output_hw=(64, 48), num_class=17):
    super().__init__()
    c = lateral_channels
    self.laterals = nn.ModuleList(
        nn.Sequential(_conv(n, c, 1), nn.BatchNorm2d(c), nn.ReLU())
        for n in in_channels)
    self.upsamples = nn.ModuleList(
        nn.Sequential(
            nn.Upsample(scale_factor=2, mode='bilinear', align_corners=True),
            _conv(c, c, 1), nn.BatchNorm2d(c))
        for _ in in_channels[:-1])
    self.predict = nn.ModuleList(
        nn.Sequential(
            _conv(c, c, 1), nn.BatchNorm2d(c), nn.ReLU(),
            _conv(c, num_class, 3),
            nn.Upsample(size=tuple(output_hw), mode='bilinear',
                        align_corners=True),
            nn.BatchNorm2d(num_class))
        for _ in in_channels)

  def forward(self, features):
    pyramid = []
    for i, feature in enumerate(features):
      level = self.laterals[i](feature)
      if i > 0:
        level = level + up
      pyramid.append(level)
      if i < len(self.upsamples):
        up = self.upsamples[i](level)
    # The official forward also runs `predict` and discards the result; it
    # changes nothing returned, so it is skipped here.
    return pyramid


class RefineNet(nn.Module):
  """Cascade i: (3 - i) expansion-2 bottlenecks, then resize to output_hw.
  `final_predict` is the COCO heatmap head on the channel-concatenated
  cascade (CPN's "refine output"); CA-PF never runs it."""

  def __init__(self, lateral_channels=256, output_hw=(64, 48), num_class=17,
               num_cascade=4):
    super().__init__()
    c = lateral_channels
    self.cascade = nn.ModuleList(
        nn.Sequential(
            *[Bottleneck(c, c // 2, 2, 1, True)
              for _ in range(num_cascade - 1 - i)],
            nn.Upsample(size=tuple(output_hw), mode='bilinear',
                        align_corners=True))
        for i in range(num_cascade))
    self.final_predict = nn.Sequential(
        Bottleneck(num_cascade * c, c // 2, 2, 1, True),
        _conv(c, num_class, 3),
        nn.BatchNorm2d(num_class))

  def forward(self, pyramid, with_heatmaps=False):
    outputs = [stage(x) for stage, x in zip(self.cascade, pyramid)]
    if with_heatmaps:
      return outputs, self.final_predict(torch.cat(outputs, dim=1))
    return outputs


class CPN(nn.Module):
  """Official CPN options; forward(NCHW images) -> 4 NCHW cascade maps, or
  (maps, refine heatmaps) with `with_heatmaps`."""

  def __init__(self, resnet_layers=(3, 4, 6, 3), width=64,
               lateral_channels=256, output_hw=(64, 48), num_class=17):
    super().__init__()
    self.resnet = ResNet(resnet_layers, width)
    self.global_net = GlobalNet(self.resnet.out_channels, lateral_channels,
                                output_hw, num_class)
    self.refine_net = RefineNet(lateral_channels, output_hw, num_class)

  def forward(self, images, with_heatmaps=False):
    return self.refine_net(self.global_net(self.resnet(images)), with_heatmaps)
