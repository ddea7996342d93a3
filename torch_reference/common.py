"""Helpers shared by the PyTorch reference modules.

``randomize_`` gives a reference model random but well-scaled numbers, so a
parity test exercises every parameter and every BatchNorm statistic (a freshly
constructed torch BatchNorm is the identity in eval mode, which would hide a
swapped mean/var or scale/bias in a converter).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm,
          nn.GroupNorm)
_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ConvTranspose2d)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int, *, gain: float = math.sqrt(2.0),
               bias_scale: float = 0.1, norm_scale: tuple = (0.5, 1.5),
               var_range: tuple = (0.5, 2.0), mean_std: float = 0.1,
               other_std: float = 0.1, example_inputs: tuple | None = None
               ) -> nn.Module:
  """Sets every parameter and norm statistic of ``model`` to random values.

  - conv / linear weights: normal with std ``gain / sqrt(fan_in)`` (He scaling,
    so activations keep their size through ReLU stacks); biases uniform in
    ``+-bias_scale``;
  - norm layers: scale uniform in ``norm_scale``, bias uniform in
    ``+-bias_scale``, running_mean normal(0, ``mean_std``), running_var uniform
    in ``var_range`` (so eval-mode BatchNorm is not the identity);
  - any other parameter (e.g. a position embedding): normal(0, ``other_std``).

  With ``example_inputs`` (the positional arguments of ``model.forward``), the
  BatchNorm statistics are instead calibrated in one eval-mode pass: each
  BatchNorm, just before it runs, gets running_mean = (mean of its actual
  input) + normal(0, ``mean_std``) * std and running_var = (variance of its
  actual input) * uniform(``var_range``). Purely random statistics let a deep
  residual net (HRNet, ResNet) grow its activations geometrically with depth;
  calibrated ones keep every layer O(1) while BatchNorm stays non-trivial.

  Deterministic in ``seed`` (a private generator; the global torch RNG is left
  alone). Works in place and returns ``model``.
  """
  rng = np.random.default_rng(seed)

  def fill(tensor, values):
    tensor.copy_(torch.from_numpy(np.asarray(values, np.float32)).reshape(
        tensor.shape).to(tensor.dtype))

  done = set()
  for module in model.modules():
    if isinstance(module, _LINEAR):
      weight = module.weight
      if isinstance(module, nn.ConvTranspose2d):
        fan_in = weight.shape[0] * weight[0, 0].numel() // module.groups
      else:
        fan_in = weight[0].numel()
      fill(weight, rng.normal(0.0, gain / math.sqrt(fan_in), weight.shape))
      done.add(id(weight))
      if module.bias is not None:
        fill(module.bias, rng.uniform(-bias_scale, bias_scale, module.bias.shape))
        done.add(id(module.bias))
    elif isinstance(module, _NORMS):
      if getattr(module, "weight", None) is not None:
        fill(module.weight, rng.uniform(*norm_scale, module.weight.shape))
        fill(module.bias, rng.uniform(-bias_scale, bias_scale, module.bias.shape))
        done.update((id(module.weight), id(module.bias)))
      if getattr(module, "running_mean", None) is not None:
        fill(module.running_mean,
             rng.normal(0.0, mean_std, module.running_mean.shape))
        fill(module.running_var, rng.uniform(*var_range, module.running_var.shape))
  for param in model.parameters():
    if id(param) not in done:
      fill(param, rng.normal(0.0, other_std, param.shape))
  if example_inputs is not None:
    _calibrate_batch_norms(model, rng, example_inputs, mean_std, var_range)
  return model


def _calibrate_batch_norms(model, rng, example_inputs, mean_std, var_range):
  """Sets BatchNorm running stats from the actual inputs of one eval pass."""
  def pre_hook(module, args):
    x = args[0].detach()
    var, mean = torch.var_mean(x, dim=[d for d in range(x.ndim) if d != 1])
    var, mean = var.double(), mean.double()
    # Floor at a fraction of the layer's mean variance: a near-constant
    # channel (e.g. a mostly dead ReLU) normalized by its own tiny variance
    # would amplify float32 round-off, which parity tolerances must absorb.
    var = var + 0.5 * var.mean() + 1e-6
    noise = rng.normal(0.0, mean_std, mean.shape)
    scale = rng.uniform(*var_range, mean.shape)
    module.running_mean.copy_(mean + torch.from_numpy(noise) * var.sqrt())
    module.running_var.copy_(var * torch.from_numpy(scale))

  bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
         and m.track_running_stats]
  handles = [m.register_forward_pre_hook(pre_hook) for m in bns]
  was_training = model.training
  try:
    model.eval()
    model(*example_inputs)
  finally:
    for h in handles:
      h.remove()
    model.train(was_training)


def state_dict_numpy(model: nn.Module) -> dict[str, np.ndarray]:
  """``model.state_dict()`` as numpy arrays (the converters' input format)."""
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
