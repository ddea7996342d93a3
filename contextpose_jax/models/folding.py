"""BatchNorm folding: a frozen backbone's inference-mode BatchNorms folded into
the convolutions that feed them, at load time.

Inference-mode BatchNorm is a per-channel affine map, so a bias-free conv
followed by it is one conv with a scaled kernel and a bias: the same numbers
up to float rounding, one pass over every activation fewer.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import flax
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp



@dataclasses.dataclass(frozen=True)
class ConvBN:
  conv: tuple[str, ...]   # module path of a bias-free conv
  bn: tuple[str, ...]     # module path of the BatchNorm applied to its output
  epsilon: float


def _module_path(module) -> tuple[str, ...]:
  return tuple(module.scope.path)


def find_conv_bn_pairs(model, variables, *args, **kwargs) -> list[ConvBN]:
  """Every BatchNorm whose input is, as traced, the output of a bias-free conv.

  Found by tracing ``model.apply(variables, *args)`` abstractly (no compute),
  so the pairing follows the real data flow, not the module names.
  """
  pairs = []
  last = {}

  def interceptor(next_fun, call_args, call_kwargs, context):
    out = next_fun(*call_args, **call_kwargs)
    if context.method_name != "__call__":
      return out
    module = context.module
    if isinstance(module, nn.Conv) and not module.use_bias:
      last["conv"], last["out"] = _module_path(module), out
    elif isinstance(module, nn.BatchNorm) and module.use_running_average:
      # A conv feeding two BNs (none here) cannot absorb both: fold the first.
      if (call_args and last.get("out") is call_args[0]
          and all(p.conv != last["conv"] for p in pairs)):
        pairs.append(ConvBN(last["conv"], _module_path(module), float(module.epsilon)))
    return out

  def trace(v, *a):
    with nn.intercept_methods(interceptor):
      return model.apply(v, *a, **kwargs)
  jax.eval_shape(trace, variables, *args)
  return pairs


def fold_batch_norm(variables, pairs: Sequence[ConvBN]):
  """Variables with each BatchNorm of ``pairs`` folded into its conv (pure).

  Inference-mode BN is per-channel affine: ``(y - mean) * g / sqrt(var + eps)
  + b``; folded, the conv kernel is scaled by ``s = g / sqrt(var + eps)`` on
  its output axis and gets the bias ``b - mean * s``. The folded BNs' params
  and statistics are dropped; run the result with ``apply_folded``. Works on
  concrete arrays (at load time) and on tracers (inside a jitted step, where
  the folded kernels cost one multiply per weight).
  """
  params = traverse_util.flatten_dict(flax.core.unfreeze(variables["params"]))
  stats = traverse_util.flatten_dict(flax.core.unfreeze(variables.get("batch_stats", {})))
  for pair in pairs:
    kernel = params[pair.conv + ("kernel",)]
    dtype = jnp.promote_types(kernel.dtype, jnp.float32)
    var = jnp.asarray(stats.pop(pair.bn + ("var",)), dtype)
    mean = jnp.asarray(stats.pop(pair.bn + ("mean",)), dtype)
    s = jnp.asarray(params.pop(pair.bn + ("scale",)), dtype) * jax.lax.rsqrt(var + pair.epsilon)
    bias = jnp.asarray(params.pop(pair.bn + ("bias",)), dtype) - mean * s
    params[pair.conv + ("kernel",)] = (jnp.asarray(kernel, dtype) * s).astype(kernel.dtype)
    params[pair.conv + ("bias",)] = bias.astype(kernel.dtype)
  out = {k: v for k, v in variables.items() if k not in ("params", "batch_stats")}
  out["params"] = traverse_util.unflatten_dict(params)
  if stats:
    out["batch_stats"] = traverse_util.unflatten_dict(stats)
  return out


def apply_folded(model, folded_variables, *args, pairs: Sequence[ConvBN], **kwargs):
  """``model.apply`` with the folded convs adding their bias and their BNs skipped."""
  convs = {p.conv for p in pairs}
  bns = {p.bn for p in pairs}

  def interceptor(next_fun, call_args, call_kwargs, context):
    if context.method_name == "__call__":
      path = _module_path(context.module)
      if path in bns:
        return call_args[0]
      if path in convs:
        y = next_fun(*call_args, **call_kwargs)
        return y + context.module.get_variable("params", "bias").astype(y.dtype)
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(interceptor):
    return model.apply(folded_variables, *args, **kwargs)
