"""PyTorch reference of the full CA-PF model, and writers of the released file formats.

``CAPF`` has the official attributes ``backbone`` and ``volume_net`` and the
official forward (NHWC images; crop keypoints mapped to ``x / 96 - 1``,
``y / 128 - 1``). The ``save_*`` functions write files in exactly the layout of
the released checkpoints, so the converter is tested on what users download.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from torch_reference.common import randomize_
from torch_reference.cpn import CPN
from torch_reference.hrnet import PoseHighResolutionNet
from torch_reference.lifter import PoseTransformer


def build_backbone(backbone: str, **kwargs) -> nn.Module:
  if backbone in ("hrnet_32", "hrnet_48"):
    kwargs.setdefault("width", int(backbone.split("_")[1]))
    return PoseHighResolutionNet(**kwargs)
  if backbone == "cpn":
    return CPN(**kwargs)
  raise ValueError(f"unknown backbone {backbone!r}")


def feature_dims(backbone: str, backbone_kwargs=None) -> tuple[int, ...]:
  kwargs = dict(backbone_kwargs or {})
  if backbone == "cpn":
    return (kwargs.get("lateral_channels", 256),) * 4
  width = kwargs.get("width", int(backbone.split("_")[1]))
  return tuple(width * 2 ** i for i in range(4))


class CAPF(nn.Module):
  """Official-layout CA-PF: ``backbone`` + ``volume_net`` (the lifter)."""

  def __init__(self, backbone: str = "hrnet_32", dataset: str = "h36m",
               backbone_kwargs=None, embed_dim=None, depth=4):
    super().__init__()
    if embed_dim is None:
      embed_dim = 128 if dataset == "h36m" else {"hrnet_32": 64, "hrnet_48": 96}[backbone]
    self.backbone = build_backbone(backbone, **dict(backbone_kwargs or {}))
    self.volume_net = PoseTransformer(feature_dims(backbone, backbone_kwargs),
                                      embed_dim=embed_dim, depth=depth,
                                      deformable=dataset == "h36m")

  def forward(self, images, keypoints_2d, keypoints_2d_crop):
    images = images.permute(0, 3, 1, 2).contiguous()
    ref = keypoints_2d_crop[..., :2] / torch.tensor([96.0, 128.0]) - 1.0
    features = self.backbone(images)
    return self.volume_net(keypoints_2d, ref, list(features))


def random_capf(backbone: str = "hrnet_32", dataset: str = "h36m", seed: int = 0,
                **kwargs) -> CAPF:
  """An eval-mode ``CAPF`` with random weights that exercise every number.

  Backbone BatchNorm statistics are calibrated on one random batch (random
  statistics would blow up a deep net); deformable offsets are scaled to move
  samples by a few pixels, as trained models do. ``kwargs`` go to ``CAPF``.
  """
  torch.manual_seed(seed)
  model = CAPF(backbone, dataset, **kwargs).eval()
  images = np.random.default_rng(seed).normal(size=(1, 3, 256, 192)).astype(np.float32)
  randomize_(model.backbone, seed, example_inputs=(torch.from_numpy(images),))
  randomize_(model.volume_net, seed + 1)
  with torch.no_grad():
    for name, p in model.volume_net.named_parameters():
      if "sampling_offsets.weight" in name:
        p.mul_(0.25)
  return model


def _capf_weights(model: CAPF) -> dict:
  # The CA-PF backbone has no COCO heatmap head (HRNet's final_layer is
  # commented out in the official CA-PF code), so released files lack it.
  return {f"module.{k}": v for k, v in model.state_dict().items()
          if not k.startswith("backbone.final_layer.")}


def save_capf_h36m(model: CAPF, path: str) -> None:
  """``best_epoch_{hrnet_32,hrnet_48,cpn}.bin``: {'epoch', 'lr', 'model', 'optimizer'}."""
  torch.save({"epoch": 1, "lr": 6.4e-4, "model": _capf_weights(model),
              "optimizer": {"state": {}, "param_groups": [{"lr": 6.4e-4, "params": []}]}},
             path)


def save_capf_3dhp(model: CAPF, path: str) -> None:
  """``HRNet_{32_64,48_96}_no_refine_*.pth``: a plain state dict with ``module.``."""
  torch.save(_capf_weights(model), path)


def save_coco_hrnet(backbone: nn.Module, path: str) -> None:
  """``pose_hrnet_w{32,48}_256x192.pth``: a plain state dict (final_layer included)."""
  torch.save(backbone.state_dict(), path)


def save_coco_cpn(backbone: nn.Module, path: str) -> None:
  """``CPN50_256x192.pth.tar``: {'epoch', 'state_dict': {'module.*'}, 'optimizer'}."""
  torch.save({"epoch": 32, "state_dict": {f"module.{k}": v for k, v in
                                          backbone.state_dict().items()},
              "optimizer": {"state": {}, "param_groups": []}}, path)
