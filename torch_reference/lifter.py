"""PyTorch reference of the CA-PF lifter (official ``PoseTransformer``).

Written for this project from the official behaviour, with the official
state-dict keys (``coord_embed``, ``feat_embed.i``, ``Spatial_pos_embed``,
``context_blocks.i``, ``res_blocks.i``, ``joint_blocks.i``, ``head.0/1``), so
files saved from it have the layout of the released checkpoints. Sampling
uses ``F.grid_sample`` itself: this is the independent reference the JAX
context sampler is tested against.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


class _DropPath(nn.Module):

  def __init__(self, rate: float):
    super().__init__()
    self.rate = rate

  def forward(self, x):
    if not self.training or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class _Mlp(nn.Module):

  def __init__(self, dim, hidden, drop=0.0):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)
    self.drop = nn.Dropout(drop)

  def forward(self, x):
    return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class _Attention(nn.Module):

  def __init__(self, dim, heads, qkv_bias=True, attn_drop=0.0, proj_drop=0.0):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
    self.proj = nn.Linear(dim, dim)
    self.attn_drop = nn.Dropout(attn_drop)
    self.proj_drop = nn.Dropout(proj_drop)

  def forward(self, x):
    b, n, c = x.shape
    q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    attn = self.attn_drop((q @ k.transpose(-1, -2) * (c // self.heads) ** -0.5).softmax(-1))
    return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(b, n, c)))


class _Block(nn.Module):

  def __init__(self, dim, heads, mlp_ratio, drop_path, drop=0.0, attn_drop=0.0):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = _Attention(dim, heads, True, attn_drop, drop)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = _Mlp(dim, int(dim * mlp_ratio), drop)
    self.drop_path = _DropPath(drop_path)

  def forward(self, x):
    x = x + self.drop_path(self.attn(self.norm1(x)))
    return x + self.drop_path(self.mlp(self.norm2(x)))


class _DeformableBlock(nn.Module):

  def __init__(self, feature_dims, dim, heads=4, samples=4, drop_path=0.0, mlp_ratio=2):
    super().__init__()
    self.heads, self.samples = heads, samples
    self.norm1 = nn.LayerNorm(dim)  # torch default eps 1e-5, as the official block
    self.attention_weights = nn.Linear(dim, heads * samples)
    self.sampling_offsets = nn.Linear(dim, 2 * heads * samples)
    self.embed_proj = nn.ModuleList(nn.Linear(d, dim // heads) for d in feature_dims)
    self.norm2 = nn.LayerNorm(dim)
    self.mlp = _Mlp(dim, int(dim * mlp_ratio))
    self.drop_path = _DropPath(drop_path)
    with torch.no_grad():
      self.sampling_offsets.weight.zero_()
      angle = torch.arange(heads, dtype=torch.float32) * (2 * math.pi / heads)
      direction = torch.stack([angle.cos(), angle.sin()], -1)
      direction = 0.01 * direction / direction.abs().amax(-1, keepdim=True)
      scale = torch.arange(1, samples + 1, dtype=torch.float32).view(1, samples, 1)
      self.sampling_offsets.bias.copy_((direction[:, None, :] * scale).reshape(-1))
      self.attention_weights.weight.zero_()
      self.attention_weights.bias.zero_()

  def forward(self, x, ref, features):
    x0, x = x[:, :1], x[:, 1:]
    b, l, p, c = x.shape
    residual = x
    x = self.norm1(x + x0)
    weights = self.attention_weights(x).view(b, l, p, self.heads, self.samples).softmax(-1)
    offsets = self.sampling_offsets(x).view(b, l, p, self.heads * self.samples, 2).tanh()
    positions = offsets + ref.view(b, 1, p, 1, 2)
    sampled = []
    for level, fmap in enumerate(features):
      values = F.grid_sample(fmap, positions[:, level], padding_mode="border",
                             align_corners=True)  # (B, C_l, P, H*S)
      sampled.append(self.embed_proj[level](values.permute(0, 2, 3, 1)))
    sampled = torch.stack(sampled, 1).view(b, l, p, self.heads, self.samples, -1)
    context = (weights.unsqueeze(-1) * sampled).sum(-2).reshape(b, l, p, c)
    x = residual + self.drop_path(context)
    x = x + self.drop_path(self.mlp(self.norm2(x)))
    return torch.cat([x0, x], 1)


class PoseTransformer(nn.Module):
  """Official-layout lifter. ``deformable=False`` is the MPI-INF-3DHP model."""

  def __init__(self, feature_dims=(32, 64, 128, 256), embed_dim=128, depth=4,
               num_heads=8, mlp_ratio=2.0, drop_path_rate=0.2, num_joints=17,
               deformable=True):
    super().__init__()
    levels = len(feature_dims)
    self.coord_embed = nn.Linear(2, embed_dim)
    self.feat_embed = nn.ModuleList(nn.Linear(d, embed_dim) for d in feature_dims)
    self.Spatial_pos_embed = nn.Parameter(torch.zeros(1, levels + 1, num_joints, embed_dim))
    rates = torch.linspace(0, drop_path_rate, depth).tolist()
    self.joint_blocks = nn.ModuleList(
        _Block(embed_dim * (levels + 1), num_heads, mlp_ratio, r) for r in rates)
    self.res_blocks = nn.ModuleList(_Block(embed_dim, num_heads, mlp_ratio, r) for r in rates)
    if deformable:
      self.context_blocks = nn.ModuleList(
          _DeformableBlock(feature_dims, embed_dim, drop_path=r) for r in rates)
    else:
      self.context_blocks = None
    self.head = nn.Sequential(nn.LayerNorm(embed_dim * (levels + 1)),
                              nn.Linear(embed_dim * (levels + 1), 3))

  def forward(self, keypoints_2d, ref, features):
    b, p, _ = keypoints_2d.shape
    tokens = [self.coord_embed(keypoints_2d)]
    for level, fmap in enumerate(features):
      ref_values = F.grid_sample(fmap, ref.unsqueeze(-2), align_corners=True)  # (B, C, P, 1)
      tokens.append(self.feat_embed[level](ref_values[..., 0].transpose(1, 2)))
    x = torch.stack(tokens, 1) + self.Spatial_pos_embed
    if self.context_blocks is not None:
      for block in self.context_blocks:
        x = block(x, ref, features)
    levels, c = x.shape[1], x.shape[-1]
    x = x.permute(0, 2, 1, 3).reshape(b * p, levels, c)
    for block in self.res_blocks:
      x = block(x)
    x = x.reshape(b, p, levels * c)
    for block in self.joint_blocks:
      x = block(x)
    return self.head(x).view(b, 1, p, 3)
