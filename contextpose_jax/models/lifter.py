"""The CA-PF lifter (the official ``PoseTransformer``, ``volume_net``).

Tokens (B, 5, 17, C): level 0 embeds the 2D keypoints, levels 1-4 embed the
backbone features sampled at the keypoints (the reference points). Then:
deformable context blocks (each level samples its own map around the
reference points at learned offsets), per-joint blocks (attention across the
5 levels of one joint), across-joint blocks (attention across the 17 joints
on the concatenated levels) and a head to 3D.

Submodule names follow the official state-dict keys (see torch_import.py).
Quirks kept from the official code so released checkpoints work:
- LayerNorm eps is 1e-6 in the transformer blocks but torch's default 1e-5 in
  the deformable blocks and in the head.
- Layers use torch's default ``nn.Linear`` init (the official model applies no
  custom init) except the deformable offsets / attention-weight layers.
- Drop path is per example of the tensor the block sees, i.e. per (batch,
  joint) row in the per-joint blocks.

Precision policy (``Lifter.dtype``, ``Lifter.matmul_precision``): parameters
are always float32; ``dtype`` is the compute dtype of the matmuls and the
token stream. LayerNorm statistics, softmaxes, the sampling positions and the
3D output stay float32 whatever ``dtype`` is. 'highest' + float32 is the
parity setting (equal to the official model to ~1e-6).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from contextpose_jax.models import materialize
from contextpose_jax.models import defaults
from contextpose_jax.models import matmul_precision
from contextpose_jax.models.sampler import grid_sample

TRANSFORMER_LN_EPS = 1e-6
TORCH_LN_EPS = 1e-5
SMALL_ATTENTION_TOKENS = 8
def _torch_uniform(fan_in: int):
  """torch nn.Linear default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class Linear(nn.Module):
  """``nn.Dense`` with torch's default initialisation."""
  features: int
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer | None = None
  bias_init: nn.initializers.Initializer | None = None
  dtype: Any = jnp.float32  # compute; the parameters stay float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init or _torch_uniform(fan_in),
                        (fan_in, self.features), jnp.float32)
    dtype = _compute_dtype(self.dtype, x)
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype), precision=self.precision)
    if self.use_bias:
      bias = self.param("bias", self.bias_init or _torch_uniform(fan_in),
                        (self.features,), jnp.float32)
      y = y + bias.astype(dtype)
    return y


def _compute_dtype(dtype, x):
  # float64 inputs (tests of the exact answer) keep float64.
  return jnp.float64 if x.dtype == jnp.float64 else jnp.dtype(dtype)


def LayerNorm(epsilon: float, name: str, dtype=None):  # pylint: disable=invalid-name
  # Two-pass variance, as torch computes it; flax takes the statistics in
  # float32 at least whatever the compute dtype.
  return nn.LayerNorm(epsilon=epsilon, use_fast_variance=False, dtype=dtype,
                      param_dtype=jnp.float32, name=name)


def _softmax(logits, axis):
  # In float32 whatever the compute dtype; the result in the logits' dtype.
  x = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  return jax.nn.softmax(x, axis=axis).astype(logits.dtype)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example (axis 0)."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep,
                                (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0.0)


class Mlp(nn.Module):
  hidden: int
  drop: float = 0.0
  dtype: Any = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x, deterministic: bool):
    dim = x.shape[-1]
    linear = functools.partial(Linear, dtype=self.dtype, precision=self.precision)
    x = linear(self.hidden, name="fc1")(x)
    x = nn.gelu(x, approximate=False)  # torch nn.GELU is the erf form
    x = nn.Dropout(self.drop)(x, deterministic=deterministic)
    x = linear(dim, name="fc2")(x)
    return nn.Dropout(self.drop)(x, deterministic=deterministic)


class Attention(nn.Module):
  num_heads: int
  qkv_bias: bool = True
  attn_drop: float = 0.0
  proj_drop: float = 0.0
  dtype: Any = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x, deterministic: bool):
    b, n, c = x.shape
    head_dim = c // self.num_heads
    linear = functools.partial(Linear, dtype=self.dtype, precision=self.precision)
    qkv = linear(3 * c, use_bias=self.qkv_bias, name="qkv")(x)
    qkv = qkv.reshape(b, n, 3, self.num_heads, head_dim)
    scale = head_dim ** -0.5
    drop = nn.Dropout(self.attn_drop)
    # Two formulations, the faster for the token count on XLA:CPU (measured,
    # forward + backward; see docs/benchmarks.md). Same maths either way.
    if n <= SMALL_ATTENTION_TOKENS:
      # The per-joint blocks attend over 5 levels: thousands of 5x5 batched
      # matmuls are 2.4x slower than torch; n multiply-reduces over the head
      # dim (one per key token) fuse and are level with it.
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, H, D)
      logits = jnp.stack([jnp.sum(q * k[:, j:j + 1], axis=-1) for j in range(n)],
                         axis=2)  # (B, Nq, Nk, H)
      attn = drop(_softmax(logits * scale, axis=2), deterministic=deterministic)
      x = sum(attn[:, :, j, :, None] * v[:, j:j + 1] for j in range(n))
      x = x.reshape(b, n, c)
    else:
      qkv = qkv.transpose(2, 0, 3, 1, 4).reshape(3, b * self.num_heads, n, head_dim)
      q, k, v = qkv[0], qkv[1], qkv[2]  # (B*H, N, D): plain batched matmuls
      logits = jax.lax.batch_matmul(q, k.transpose(0, 2, 1), precision=self.precision)
      attn = drop(_softmax(logits * scale, axis=-1), deterministic=deterministic)
      x = jax.lax.batch_matmul(attn, v, precision=self.precision)
      x = x.reshape(b, self.num_heads, n, head_dim).transpose(0, 2, 1, 3).reshape(b, n, c)
    x = linear(c, name="proj")(x)
    return nn.Dropout(self.proj_drop)(x, deterministic=deterministic)


class Block(nn.Module):
  """Pre-norm transformer block (per-joint and across-joint blocks)."""
  num_heads: int
  mlp_ratio: float = 2.0
  qkv_bias: bool = True
  drop: float = 0.0
  attn_drop: float = 0.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x, deterministic: bool):
    dim = x.shape[-1]
    drop_path = DropPath(self.drop_path)
    y = LayerNorm(TRANSFORMER_LN_EPS, "norm1", self.dtype)(x)
    y = Attention(self.num_heads, self.qkv_bias, self.attn_drop, self.drop,
                  self.dtype, self.precision, name="attn")(y, deterministic)
    x = x + drop_path(y, deterministic)
    y = LayerNorm(TRANSFORMER_LN_EPS, "norm2", self.dtype)(x)
    y = Mlp(int(dim * self.mlp_ratio), self.drop, self.dtype, self.precision,
            name="mlp")(y, deterministic)
    # Written once (and its cotangent): XLA:CPU would fuse the residual
    # stream into every later block's fusions and re-read every earlier
    # block's outputs there (materialize.py).
    return materialize.materialized(x + drop_path(y, deterministic))


def _offset_bias_init(num_heads: int, num_samples: int):
  """Official offsets init: head h points along angle 2*pi*h/H, scaled so the
  larger of |cos|, |sin| is 0.01, times (sample index + 1)."""
  def init(key, shape, dtype=jnp.float32):
    del key
    theta = np.arange(num_heads, dtype=np.float32) * (2.0 * math.pi / num_heads)
    grid = np.stack([np.cos(theta), np.sin(theta)], -1)
    grid = 0.01 * grid / np.abs(grid).max(-1, keepdims=True)
    grid = grid[:, None, :] * np.arange(1, num_samples + 1, dtype=np.float32)[None, :, None]
    assert grid.size == int(np.prod(shape))
    return jnp.asarray(grid.reshape(shape), dtype)
  return init


class DeformableBlock(nn.Module):
  """Deformable context block: each feature level attends to ``num_heads x
  num_samples`` points sampled around the reference points."""
  num_heads: int = 4
  num_samples: int = 4
  mlp_ratio: float = 2.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x, ref, features: Sequence[jax.Array], deterministic: bool):
    # x: (B, 1 + L, P, C); ref: (B, P, 2) normalized; features: L maps.
    x_0, x = x[:, :1], x[:, 1:]
    b, l, p, c = x.shape
    heads, samples = self.num_heads, self.num_samples
    head_dim = c // heads
    linear = functools.partial(Linear, dtype=self.dtype, precision=self.precision)
    residual = x
    x = LayerNorm(TORCH_LN_EPS, "norm1", self.dtype)(x + x_0)

    weights = linear(heads * samples, kernel_init=nn.initializers.zeros,
                     bias_init=nn.initializers.zeros, name="attention_weights")(x)
    weights = _softmax(weights.reshape(b, l, p, heads, samples), axis=-1)
    # The offsets in float32 whatever the compute dtype: a bf16 sampling
    # position is off by up to ~0.1 pixel on the 64x48 map.
    offsets = Linear(2 * heads * samples, kernel_init=nn.initializers.zeros,
                     bias_init=_offset_bias_init(heads, samples),
                     dtype=jnp.promote_types(ref.dtype, jnp.float32),
                     precision=self.precision, name="sampling_offsets")(x)
    offsets = jnp.tanh(offsets.reshape(b, l, p, heads * samples, 2))
    positions = offsets + ref[:, None, :, None, :]  # (B, L, P, H*S, 2)

    sampled = []
    for level, feature_map in enumerate(features):
      # One sampler call for all joints, heads and samples of this level.
      values = grid_sample(feature_map, positions[:, level], padding_mode="border")
      sampled.append(linear(head_dim, name=f"embed_proj_{level}")(values))
    sampled = jnp.stack(sampled, axis=1).reshape(b, l, p, heads, samples, head_dim)
    context = jnp.einsum("blphs,blphsd->blphd", weights, sampled,
                         precision=self.precision).reshape(b, l, p, c)

    drop_path = DropPath(self.drop_path)
    x = residual + drop_path(context, deterministic)
    y = LayerNorm(TORCH_LN_EPS, "norm2", self.dtype)(x)
    x = x + drop_path(Mlp(int(c * self.mlp_ratio), 0.0, self.dtype, self.precision,
                          name="mlp")(y, deterministic), deterministic)
    return materialize.materialized(jnp.concatenate([x_0, x], axis=1))  # as in Block


_DEFAULTS = defaults.LIFTER


class Lifter(nn.Module):
  """2D keypoints + sampled context -> root-relative 3D pose (B, 1, P, 3).

  ``use_context=False`` is the context-free baseline: only the keypoint
  tokens (one level), no feature tokens and no deformable blocks.
  """
  # The official values: defaults.LIFTER (read by configs without flax).
  embed_dim: int = _DEFAULTS["embed_dim"]
  depth: int = _DEFAULTS["depth"]
  num_heads: int = _DEFAULTS["num_heads"]
  mlp_ratio: float = _DEFAULTS["mlp_ratio"]
  qkv_bias: bool = _DEFAULTS["qkv_bias"]
  drop_rate: float = _DEFAULTS["drop_rate"]
  attn_drop_rate: float = _DEFAULTS["attn_drop_rate"]
  drop_path_rate: float = _DEFAULTS["drop_path_rate"]
  deformable: bool = _DEFAULTS["deformable"]
  use_context: bool = _DEFAULTS["use_context"]
  deformable_heads: int = _DEFAULTS["deformable_heads"]
  deformable_samples: int = _DEFAULTS["deformable_samples"]
  # Precision policy (see the module docstring): compute dtype 'float32' |
  # 'bfloat16'; matmul precision 'highest' | 'high' | 'default'.
  dtype: Any = _DEFAULTS["dtype"]
  matmul_precision: str = _DEFAULTS["matmul_precision"]

  @nn.compact
  def __call__(self, keypoints_2d, ref, features: Sequence[jax.Array],
               train: bool = False):
    deterministic = not train
    b, p, _ = keypoints_2d.shape
    c = self.embed_dim
    dtype = _compute_dtype(self.dtype, keypoints_2d)
    precision = matmul_precision(self.matmul_precision)
    linear = functools.partial(Linear, dtype=dtype, precision=precision)
    blocks = dict(dtype=dtype, precision=precision)
    tokens = [linear(c, name="coord_embed")(keypoints_2d)]
    if self.use_context:
      for level, feature_map in enumerate(features):
        ref_features = grid_sample(feature_map, ref, padding_mode="zeros")
        tokens.append(linear(c, name=f"feat_embed_{level}")(ref_features))
    x = jnp.stack(tokens, axis=1)  # (B, levels, P, C)
    levels = x.shape[1]
    pos_embed = self.param("Spatial_pos_embed", nn.initializers.zeros,
                           (1, levels, p, c), jnp.float32)
    x = nn.Dropout(self.drop_rate)(x + pos_embed.astype(dtype),
                                   deterministic=deterministic)

    # Stochastic depth grows linearly with the block index (same in all 3 stacks).
    drop_path = np.linspace(0.0, self.drop_path_rate, self.depth)
    if self.use_context and self.deformable:
      for i in range(self.depth):
        x = DeformableBlock(self.deformable_heads, self.deformable_samples,
                            drop_path=float(drop_path[i]), **blocks,
                            name=f"context_blocks_{i}")(x, ref, features, deterministic)

    x = x.transpose(0, 2, 1, 3).reshape(b * p, levels, c)
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_ratio, self.qkv_bias, self.drop_rate,
                self.attn_drop_rate, float(drop_path[i]), **blocks,
                name=f"res_blocks_{i}")(x, deterministic)
    x = x.reshape(b, p, levels * c)
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_ratio, self.qkv_bias, self.drop_rate,
                self.attn_drop_rate, float(drop_path[i]), **blocks,
                name=f"joint_blocks_{i}")(x, deterministic)

    x = LayerNorm(TORCH_LN_EPS, "head_0", dtype)(x)
    x = linear(3, name="head_1")(x)
    return x.reshape(b, 1, p, 3).astype(jnp.promote_types(dtype, jnp.float32))
