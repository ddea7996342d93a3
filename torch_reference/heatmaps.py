"""PyTorch reference of the official HRNet heatmap decoding.

Written from the semantics of ``get_max_preds`` / ``get_final_preds`` /
``transform_preds`` of the HRNet reference code (``lib/core/inference.py``,
``lib/utils/transforms.py``): NCHW heatmaps as the official code takes them,
torch ops, and the post-processing as the official per-joint loop (not
vectorized), so that it shares no code or structure with
``contextpose_jax.models.heatmaps``.
"""
from __future__ import annotations

import math

import torch


def get_max_preds(heatmaps: torch.Tensor):
  """(B, J, H, W) -> preds (B, J, 2) float32 heatmap pixels, maxvals (B, J, 1)."""
  b, j, _, w = heatmaps.shape
  flat = heatmaps.reshape(b, j, -1)
  maxvals = torch.amax(flat, dim=2, keepdim=True)
  idx = torch.argmax(flat, dim=2, keepdim=True)  # first of ties, as np.argmax
  preds = idx.repeat(1, 1, 2).to(torch.float32)
  preds[:, :, 0] = preds[:, :, 0] % w
  preds[:, :, 1] = torch.floor(preds[:, :, 1] / w)
  mask = (maxvals > 0.0).repeat(1, 1, 2).to(torch.float32)
  return preds * mask, maxvals


def get_final_preds_heatmap(heatmaps: torch.Tensor):
  """get_final_preds with POST_PROCESS, before transform_preds (heatmap pixels)."""
  coords, maxvals = get_max_preds(heatmaps)
  h, w = heatmaps.shape[2], heatmaps.shape[3]
  for n in range(coords.shape[0]):
    for p in range(coords.shape[1]):
      hm = heatmaps[n][p]
      px = int(math.floor(float(coords[n][p][0]) + 0.5))
      py = int(math.floor(float(coords[n][p][1]) + 0.5))
      if 1 < px < w - 1 and 1 < py < h - 1:
        diff = torch.stack([hm[py][px + 1] - hm[py][px - 1],
                            hm[py + 1][px] - hm[py - 1][px]])
        coords[n][p] += torch.sign(diff).to(coords.dtype) * 0.25
  return coords, maxvals


def transform_preds_hrnet(coords: torch.Tensor, center, scale, output_size):
  """The official ``transform_preds`` (rotation 0) in closed form: heatmap point
  p -> center + (p - output_size / 2) * (200 * scale_w / output_w)."""
  center = torch.as_tensor(center, dtype=torch.float64)
  box_w = float(scale[0]) * 200.0
  half = torch.tensor([output_size[0] * 0.5, output_size[1] * 0.5], dtype=torch.float64)
  return center + (coords.to(torch.float64) - half) * (box_w / output_size[0])


def crop_to_frame_h36m(crop_points: torch.Tensor, center, scale, crop_w: int = 192,
                       crop_h: int = 256):
  """Inverse of the H36M-Toolbox crop warp in closed form: crop point c ->
  center + (c - ((W-1)/2, (H-1)/2)) * (200 * scale_w - 1) / (W - 1)."""
  center = torch.as_tensor(center, dtype=torch.float64)
  box_w = float(scale[0]) * 200.0
  mid = torch.tensor([(crop_w - 1) * 0.5, (crop_h - 1) * 0.5], dtype=torch.float64)
  return center + (crop_points.to(torch.float64) - mid) * ((box_w - 1) / (crop_w - 1))
